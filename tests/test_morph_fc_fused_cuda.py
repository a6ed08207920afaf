"""The CUDA backend of the fused MorphFC layer's internal ops, ``_morph_branch`` and
``_reweighted_proj`` (csrc/morph_fc_fused.cu), through their CPU build.

On CPU tensors the extension's ``_morph_branch_cuda`` / ``_reweighted_proj_cuda`` (+ backward)
run csrc/morph_fc_fused_cpu.cpp: the same host functions (morph_fc_fused.h), operands and
epilogues as the CUDA build, each GEMM run tile by tile on the engine's tiles by
gemm/host_engine.h. These tests register that build as the ops' ``cuda`` backend for CPU
tensors and run the backend suites of tests/test_morph_fc_fused.py and test_morph_fc_proj.py
on it, plus shapes whose GEMMs span several 128 x 128 tiles with batch items straddling row
tiles (the tile-sum layouts: mean partials, dalpha partials). The kernels themselves run only
in the needs_cuda tests of those files (``gpu_backend`` = cuda).
"""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops_testing import cpu_build_as_cuda

import cuda_sass
import test_morph_fc_fused as branch_suite
import test_morph_fc_fused_modules as modules_suite
import test_morph_fc_proj as proj_suite

pytestmark = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)

f64 = torch.float64


@pytest.fixture
def cpu_build(monkeypatch):
    """The CPU build as the ``cuda`` backend of both ops and of morph_fc (the modules' path choice)."""
    return cpu_build_as_cuda(monkeypatch, "_morph_branch", "_reweighted_proj", "morph_fc")


# (axis, x shape, segment_dim) past one 128 x 128 tile: M = 672 rows of 224 per item (row tiles
# straddle items), F = 140 (two column tiles, D = 10 does not divide 128); the channel FC over
# 3 items of 105 tokens, C = 140; "t" with F = 4 * 36 = 144
WIDE_BRANCHES = [
    ("w", (3, 2, 8, 14, 140), 14),
    ("hs", (2, 1, 8, 14, 140), 14),
    ("c", (3, 3, 5, 7, 140), 1),
    ("t", (2, 4, 3, 5, 72), 2),
]


@pytest.mark.parametrize("case", branch_suite.CASES + WIDE_BRANCHES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_branch_matches_reference(case, cpu_build):
    axis, shape, L = case
    branch_suite._check(cpu_build, axis, *branch_suite._inputs(shape, L, axis), L)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", WIDE_BRANCHES[:3], ids=lambda c: c[0])
def test_branch_storage_dtypes(case, dtype, cpu_build):
    axis, shape, L = case
    branch_suite._check(cpu_build, axis, *branch_suite._inputs(shape, L, axis, dtype), L, dtype)


@pytest.mark.parametrize("axis", ["h", "c"])
def test_branch_channels_last_view(axis, cpu_build):
    branch_suite.test_branch_float32_and_channels_last_view(axis, cpu_build)


@pytest.mark.parametrize("axis", ["w", "hs", "c"])
def test_branch_gradcheck(axis, cpu_build):
    branch_suite.test_branch_gradcheck(axis, cpu_build)


@pytest.mark.parametrize("axis", ["h", "c"])
def test_branch_opcheck(axis, cpu_build):
    branch_suite.test_branch_opcheck(axis, cpu_build)


def test_branch_empty_frame(cpu_build):
    """No tokens: an empty y and zero means, zero weight gradients."""
    x, w, b = (t.requires_grad_() for t in branch_suite._inputs((2, 0, 4, 8), 2, "c"))
    y, mean = branch_suite.morph_branch(x, w, b, segment_dim=1, axis="c", backend=cpu_build)
    assert y.shape == x.shape and torch.equal(mean, torch.zeros(2, 8, dtype=f64))
    gw, gb = torch.autograd.grad((y.sum() + mean.sum()), [w, b])
    assert not gw.any() and not gb.any()


# (branch shape, K): M = 378 tokens of 126 per item over three row tiles, C = 140
WIDE_PROJ = [((3, 9, 14, 140), 3), ((2, 3, 7, 11, 132), 2)]


@pytest.mark.parametrize("case", proj_suite.CASES + WIDE_PROJ, ids=lambda c: f"K{c[1]}-{'x'.join(map(str, c[0]))}")
def test_proj_matches_reference(case, cpu_build):
    shape, K = case
    proj_suite._check(cpu_build, *proj_suite._inputs(shape, K))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_proj_storage_dtypes(dtype, cpu_build):
    shape, K = WIDE_PROJ[0]
    proj_suite._check(cpu_build, *proj_suite._inputs(shape, K, dtype), dtype)


def test_proj_non_contiguous_and_no_bias(cpu_build):
    proj_suite.test_proj_float32_non_contiguous_and_no_bias(cpu_build)


@pytest.mark.parametrize("K", [2, 3])
def test_proj_gradcheck(K, cpu_build):
    proj_suite.test_proj_gradcheck(K, cpu_build)


@pytest.mark.parametrize("K", [2, 3])
def test_proj_opcheck(K, cpu_build):
    proj_suite.test_proj_opcheck(K, cpu_build)


@pytest.mark.parametrize("case", modules_suite.MODULES, ids=["S", "S-image-84", "S2", "T", "block-S", "block-S2"])
def test_fused_modules_take_the_cuda_path(case, cpu_build):
    """The fused MorphFC layers on the cuda backend: the fused path is taken and matches the
    float64 reference module."""
    from mixops import backend
    from mixops.nn import morph_fc as nn_morph

    make, fwd, shape = case
    with mixops.use_backend(cpu_build):
        assert backend.fused_backend("morph_fc", nn_morph._FUSED_OPS, torch.empty(shape)) == "cuda"
    modules_suite._check(modules_suite._random_state(make()), torch.randn(shape), fwd, cpu_build, torch.float32)


# each GEMM of the two ops: the markers its sm_90a kernel names hold
FUSED_GEMMS = {
    "branch forward (mean tile sums)": ("12ChunkOperandI", "11BranchStore"),
    "branch dX (dY + gm operand)": ("13ChunkPlusMean", "10ChunkStore"),
    "branch dW (split-K)": ("13ChunkPlusMean", "11MatrixStore"),
    "proj forward (weighted-sum operand)": ("13MixedBranches", "10ChunkStore"),
    "proj dMix (branch grads, dalpha tile sums)": ("13ProjGradStore",),
    "proj dW (split-K)": ("13MixedBranches", "11MatrixStore"),
}


def test_build_runs_every_fused_gemm_on_the_engine():
    """Every GEMM of the two ops is an engine kernel on sm_90a, one per (tile, dtype): bf16 and
    fp16 on wgmma, TF32, IEEE fp32 and fp64 on FMAs (test_gemm_engine.py checks every engine
    kernel's instructions and spills); no kernel calls the 64-bit division subroutine, the tile
    sums included."""
    kernels = cuda_sass.extension_engine_sass("8morph_fc")
    sm90 = {name for arch, name in kernels if arch == "sm_90a"}
    for gemm, markers in FUSED_GEMMS.items():
        names = {n for n in sm90 if all(m in n for m in markers)}
        assert sorted(cuda_sass.engine_tile(n) for n in names) == [
            "Simt", "Simt", "Sm90Wgmma", "Sm90Wgmma", "Tf32Mma"], (gemm, sorted(names))
    for (arch, name), sass in kernels.items():
        assert not cuda_sass.calls(sass), f"{name} on {arch} calls the 64-bit division subroutine"


@pytest.mark.needs_cuda
def test_cuda_small_case_for_compute_sanitizer():
    """One small call of each op and its backward on the GPU, partial tiles on every edge, every
    dtype; run this test alone under ``compute-sanitizer`` (memcheck, racecheck) to check the
    kernels' masks, tile sums and barriers."""
    for dtype in (f64, torch.float32, torch.float16, torch.bfloat16):
        for axis, shape, L in (("w", (2, 3, 6, 10, 20), 4), ("c", (3, 2, 3, 5, 20), 1)):
            branch_suite._check("cuda", axis, *branch_suite._inputs(shape, L, axis, dtype, "cuda"), L, dtype)
        proj_suite._check("cuda", *proj_suite._inputs((2, 3, 5, 7, 20), 3, dtype, "cuda"), dtype)
