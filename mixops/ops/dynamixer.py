"""placeholder"""
def dynamixer_mix(*a, **k): raise RuntimeError("placeholder")
