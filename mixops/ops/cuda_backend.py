"""The CUDA backend: the one place where the ops of the compiled extension ``mixops._C``
(``torch.ops.mixops._<op>_cuda`` and ``_<op>_cuda_backward``, ``csrc/``) are registered as the
``cuda`` implementation of their ops (``mixops.backend.register``).

Nothing is registered when the extension is not built or not loadable
(``mixops.cuda_extension_status()`` says why). The schemas of the extension's ops mirror the
backend contract, so the registered callables are the ops themselves.
"""
from __future__ import annotations

import torch

from .._extension import cuda_extension_available
from ..backend import register

if cuda_extension_available():
    ops = torch.ops.mixops
    # auto=False: these kernels compile for sm_75..sm_90a and the per-element math they share
    # with the CPU emulation (csrc/*_cpu.cpp) passes the CPU tests, but they have not run on a
    # GPU yet; until they have, they run only when asked for by name.
    register("atm_sample", "cuda", forward=ops._atm_sample_cuda, backward=ops._atm_sample_cuda_backward, auto=False)
    register("atm_fc", "cuda", forward=ops._atm_fc_cuda, backward=ops._atm_fc_cuda_backward, auto=False)
    # the fused ATMLayer's internal ops (mixops.ops.atm_layer)
    register("_atm_means", "cuda", forward=ops._atm_means_cuda, backward=ops._atm_means_cuda_backward, auto=False)
    register("_atm_mix", "cuda", forward=ops._atm_mix_cuda, backward=ops._atm_mix_cuda_backward, auto=False)
    register("morph_fc", "cuda", forward=ops._morph_fc_cuda, backward=ops._morph_fc_cuda_backward, auto=False)
    # the fused MorphFC layer's internal ops (mixops.ops.morph_fc_fused)
    register("_morph_branch", "cuda", forward=ops._morph_branch_cuda, backward=ops._morph_branch_cuda_backward,
             auto=False)
    register("_reweighted_proj", "cuda", forward=ops._reweighted_proj_cuda,
             backward=ops._reweighted_proj_cuda_backward, auto=False)
    register("partition_fc", "cuda", forward=ops._partition_fc_cuda, backward=ops._partition_fc_cuda_backward,
             auto=False)
    register("window_attention", "cuda", forward=ops._window_attention_cuda,
             backward=ops._window_attention_cuda_backward, auto=False)
