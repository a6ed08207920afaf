"""placeholder"""
DynaMixerOp = DynaMixerBlock = None
