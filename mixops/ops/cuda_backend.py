"""The CUDA backend: the one place where the ops of the compiled extension ``mixops._C``
(``torch.ops.mixops._<op>_cuda`` and ``_<op>_cuda_backward``, ``csrc/``) are registered as the
``cuda`` implementation of their ops (``mixops.backend.register``).

Nothing is registered when the extension is not built. The op schemas mirror the backend
contract, so the registered callables are the ops themselves.
"""
from __future__ import annotations

import torch

from .._extension import cuda_extension_available
from ..backend import register

if cuda_extension_available():
    # ATM (csrc/atm.cu). auto=False: compiled for sm_75..sm_90 and checked on CPU through the
    # emulation of the same math (csrc/atm_cpu.cpp), but not yet run on a GPU; until it has,
    # it runs only when asked for by name.
    register("atm_sample", "cuda", forward=torch.ops.mixops._atm_sample_cuda,
             backward=torch.ops.mixops._atm_sample_cuda_backward, auto=False)
    register("atm_fc", "cuda", forward=torch.ops.mixops._atm_fc_cuda,
             backward=torch.ops.mixops._atm_fc_cuda_backward, auto=False)
