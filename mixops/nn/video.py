"""placeholder"""
SABlock = None
