"""Pure-PyTorch restatements of the official computations: the oracle every kernel is tested
against (in float64), the ``torch`` backend, and the baseline the benchmarks beat.

Each file follows its official code's own sequence of operations (reshape/permute/Linear,
``deform_conv2d``, pad + partition); none of them is clever on purpose.
"""
from . import atm, dynamixer, morph_fc, repmlp, window_attention

__all__ = ["atm", "dynamixer", "morph_fc", "repmlp", "window_attention"]
