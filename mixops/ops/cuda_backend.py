"""The CUDA backend: the one place where the ops of the compiled extension ``mixops._C`` are
registered as the ``cuda`` implementation of their ops (``mixops.backend.register``).

Nothing is registered when the extension is not built or not loadable
(``mixops.cuda_extension_status()`` says why). The schemas of the extension's ops mirror the
backend contract, so each op registers its forward and backward ops as they are.
"""
from __future__ import annotations

import torch

from .._extension import cuda_extension_available
from ..backend import register

if cuda_extension_available():
    # auto=False: these kernels compile for sm_75..sm_90a and their index maps pass the CPU
    # emulation tests, but they have not run on a GPU yet; until they have, they run only when
    # asked for by name.
    register(
        "morph_fc",
        "cuda",
        forward=torch.ops.mixops._morph_fc_cuda,
        backward=torch.ops.mixops._morph_fc_cuda_backward,
        auto=False,
    )
