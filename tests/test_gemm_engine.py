"""The device code of the gathered-GEMM engine (csrc/gemm/), read without a GPU.

Every CUDA GEMM of mixops is an instantiation of ``gathered_gemm_kernel`` on one of four tiles
(csrc/gemm/tiles.cuh). What each must compile to, on the architectures it serves:

- sm_90a (the extension as built, CI builds it for sm_90a alone): fp16/bf16 on ``Sm90Wgmma``:
  HGMMA (wgmma) fed from shared memory that cp.async (LDGSTS) filled; TF32 on ``Tf32Mma``: HMMA
  and LDGSTS; IEEE fp32 / fp64 on ``Simt``: FFMA / DFMA and LDGSTS. None spills to local memory,
  none is a trap stand-in, and no mma.sync copy of the fp16/bf16 GEMMs is built for sm_90a.
- sm_80 (tests/test_cuda_sources.py compiles each CUDA source once more for it): ``Sm80Mma`` and
  ``Tf32Mma``: HMMA (fed by ldmatrix for fp16/bf16) and LDGSTS, ``Simt`` LDGSTS; no wgmma exists
  there, so no ``Sm90Wgmma`` is instantiated.
The table is cuda_sass.ENGINE_MUST.
"""
from __future__ import annotations

import pytest

import cuda_sass


def test_extension_engine_kernels_on_sm90a():
    ext = pytest.importorskip("mixops._C", reason="the CUDA extension is not built")
    kernels = cuda_sass.object_sass(ext.__file__, lambda name: cuda_sass.ENGINE_KERNEL in name)
    archs = {a for a, _ in kernels}
    if "sm_90a" not in archs:
        pytest.skip(f"the build has no sm_90a code: {sorted(archs)}")
    assert cuda_sass.check_engine_kernels(kernels, "sm_90a") == {"Sm90Wgmma", "Tf32Mma", "Simt"}
