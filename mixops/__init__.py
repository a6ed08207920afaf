"""mixops: fused kernels for the token mixers of MLP-like and hybrid vision backbones.

Functional ops (``mixops.morph_fc``, ``mixops.atm_sample``, ...) dispatch to a backend
(``torch`` reference, ``triton``, ``cuda``) per ``mixops.backend``; ``mixops.nn`` holds the
drop-in modules that load the official checkpoints.
"""
from ._extension import cuda_extension_available, cuda_extension_status
from .backend import available_backends, use_backend
from .ops import (
    atm_fc,
    atm_sample,
    dynamixer_mix,
    locality_injection,
    morph_fc,
    partition_fc,
    window_attention,
)
from . import nn, reference  # noqa: E402  (after the ops they use)

__version__ = "0.1.0"

__all__ = [
    "atm_fc",
    "atm_sample",
    "available_backends",
    "cuda_extension_available",
    "cuda_extension_status",
    "dynamixer_mix",
    "locality_injection",
    "morph_fc",
    "nn",
    "partition_fc",
    "reference",
    "use_backend",
    "window_attention",
]
