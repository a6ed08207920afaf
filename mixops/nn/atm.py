"""placeholder"""
ATMOp = ATMLayer = None
