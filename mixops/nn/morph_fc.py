"""placeholder"""
MorphFC_S = MorphFC_S2 = MorphFC_T = PermutatorBlock = None
