"""placeholder"""
Attention = SABlock = SABlock_Windows = None
