"""placeholder"""
RepMLPBlock = None
