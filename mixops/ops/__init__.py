"""The public functional ops, each a ``torch.library.custom_op`` in the ``mixops`` namespace."""
from .atm import atm_fc, atm_sample
from . import atm_layer  # noqa: F401  (the fused ATMLayer's internal ops)
from .dynamixer import dynamixer_mix
from .morph_fc import morph_fc
from . import morph_fc_fused  # noqa: F401  (internal ops of the fused MorphFC layer path)
from .repmlp import locality_injection, partition_fc
from .window_attention import window_attention
from . import triton_backend  # noqa: E402,F401  (after the ops it registers kernels for)
from . import cuda_backend  # noqa: E402,F401  (likewise, for the compiled extension's kernels)

__all__ = [
    "atm_fc",
    "atm_sample",
    "dynamixer_mix",
    "locality_injection",
    "morph_fc",
    "partition_fc",
    "window_attention",
]
