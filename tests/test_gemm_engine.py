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
import torch

import cuda_sass
from mixops_testing import assert_close, fp32_matmul


def test_extension_engine_kernels_on_sm90a():
    kernels = cuda_sass.extension_engine_sass()
    assert cuda_sass.check_engine_kernels(kernels, "sm_90a") == {"Sm90Wgmma", "Tf32Mma", "Simt"}


def test_no_kernel_of_the_extension_spills():
    """Every kernel of the build, engine or not (column sums, gathers), keeps to registers, but
    the window-attention kernels' bounded, documented spills (cuda_sass.known_spill)."""
    kernels = cuda_sass.extension_engine_sass()  # skips or fails as the engine test does
    ext = pytest.importorskip("mixops._C")
    every = cuda_sass.object_sass(ext.__file__)
    assert len(every) > len(kernels)
    unbounded = [name for (_, name), sass in every.items()
                 if cuda_sass.spills(sass) and not cuda_sass.known_spill(name, sass)]
    assert not unbounded


# --- the engine itself on a GPU (mixops::_gemm_engine, csrc/gemm_check.cu) --------------------

# odd and edge shapes: one element; a K tail inside the last k-block (7) and one that skips
# k-blocks (112 = 7 x 16 of 128); M, N not multiples of any tile; several K steps and splits
SHAPES = [(1, 1, 1), (129, 112, 112), (300, 130, 7), (64, 64, 1000), (1000, 200, 2050)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _operands(M, N, K, layout, dtype, misaligned):
    """a [M, K], b [N, K] laid out as `layout` asks (k: contiguous along K, r: along the rows);
    misaligned: the data one element past an aligned address, so runs shrink to 8/4 bytes or
    single elements."""
    def make(rows, cols, along_k):
        shape = (rows, cols + misaligned) if along_k else (cols, rows + misaligned)
        t = torch.randn(shape, dtype=torch.float64, device="cuda") / K ** 0.5
        t = t.to(dtype)
        return t[:, misaligned:] if along_k else t[:, misaligned:].t()
    return make(M, K, layout[0] == "k"), make(N, K, layout[1] == "k")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("misaligned", [0, 1])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["kk", "kr", "rr"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_matches_float64_matmul(dtype, layout, shape, misaligned):
    M, N, K = shape
    a, b = _operands(M, N, K, layout, dtype, misaligned)
    torch.full((4 * M * N + 4096,), float("nan"), dtype=dtype, device="cuda")  # NaN in the cache
    out = torch.ops.mixops._gemm_engine(a, b, layout)
    assert out.shape == (M, N) and out.dtype == dtype
    assert_close(out, a.double() @ b.double().t(), dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_engine_tf32_follows_torch(dtype):
    """fp32 runs on TF32 tensor cores exactly where torch's own matmuls may (TF32 error then:
    ~1e-3 relative), IEEE fp32 else; fp16 is unaffected."""
    a, b = _operands(256, 256, 512, "kk", dtype, 0)
    expect = a.double() @ b.double().t()
    ieee = torch.ops.mixops._gemm_engine(a, b, "kk")
    with fp32_matmul("fp32_precision", "tf32"):
        tf32 = torch.ops.mixops._gemm_engine(a, b, "kk")
    def rel(out):
        return float((out.double() - expect).norm() / expect.norm())

    if dtype == torch.float32:
        assert rel(ieee) < 1e-6 and 1e-5 < rel(tf32) < 5e-3, (rel(ieee), rel(tf32))
    else:
        assert torch.equal(ieee, tf32)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_split_k_is_deterministic(dtype):
    a, b = _operands(300, 200, 5000, "rr", dtype, 0)
    first = torch.ops.mixops._gemm_engine(a, b, "rr")
    assert torch.equal(first, torch.ops.mixops._gemm_engine(a, b, "rr"))
