"""placeholder"""
def window_attention(*a, **k): raise RuntimeError("placeholder")
