"""Loading the compiled extension ``mixops._C`` (optional).

The extension registers its ops under ``torch.ops.mixops`` when it is imported. mixops works
without it (the torch and Triton backends); ``cuda_extension_status()`` says why it is absent.
"""
from __future__ import annotations

import importlib

_status: str = "not loaded yet"
_loaded: bool = False


def _load() -> None:
    global _status, _loaded
    try:
        importlib.import_module("mixops._C")
    except ImportError as e:  # not built (CPU torch, no nvcc, MIXOPS_SKIP_CUDA) or broken
        _status = f"mixops._C could not be imported: {e}"
        return
    _loaded = True
    _status = "loaded"


def cuda_extension_available() -> bool:
    """True when ``mixops._C`` is built and loaded (its ops are in ``torch.ops.mixops``)."""
    return _loaded


def cuda_extension_status() -> str:
    """'loaded', or the reason the extension is not available."""
    return _status


_load()
