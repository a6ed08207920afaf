"""The CUDA backend of ``window_attention`` (csrc/window_attention.cu), through its CPU build, and
the build's kernels.

On CPU tensors the extension's ``_window_attention_cuda`` (+ backward) runs
csrc/window_attention_cpu.cpp: the same host functions (window_attention.h), window map and row
math (window_attention_map.cuh) as the CUDA build, each kernel's blocks as plain loops. These
tests register that build as the op's ``cuda`` backend for CPU tensors and run the op suite of
tests/test_window_attention_op.py on it, plus windows of several query and key blocks at the
configs' head dims, the virtual key's per-block partials alone, the entry points' checks, and
the sm_90a SASS of the kernels. The kernels themselves run only in the needs_cuda tests.
"""
from __future__ import annotations

import re

import pytest
import torch

import cuda_sass
import mixops
import test_window_attention_op as ops_suite
import test_window_attention_triton as triton_suite
from mixops.reference import window_attention as ref
from mixops_testing import assert_close, cpu_build_as_cuda

pytestmark = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)

OP = "window_attention"
F64 = torch.float64


@pytest.fixture
def cpu_build(monkeypatch):
    """The CPU build as the ``cuda`` backend of window_attention."""
    return cpu_build_as_cuda(monkeypatch, OP)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", ops_suite.CASES)
def test_matches_reference(B, H, W, ws, padding, bias, cpu_build):
    ops_suite.test_matches_reference(B, H, W, ws, padding, bias, F64, cpu_build)
    ops_suite.test_backward_matches_reference(B, H, W, ws, padding, cpu_build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_storage_dtypes(dtype, cpu_build):
    ops_suite.test_matches_reference(2, 7, 5, 3, "bias", True, dtype, cpu_build)


@pytest.mark.parametrize("layout", ["transposed", "channel-slice", "strided-bias"])
def test_non_contiguous_inputs(layout, cpu_build):
    ops_suite.test_non_contiguous_inputs(layout, cpu_build)


def test_video_and_scale(cpu_build):
    ops_suite.test_video_global_is_global_over_thw(cpu_build)
    ops_suite.test_default_scale_and_explicit_scale(cpu_build)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", ops_suite.GRAD_CASES)
def test_gradcheck(B, H, W, ws, padding, bias, cpu_build):
    ops_suite.test_gradcheck(B, H, W, ws, padding, bias, cpu_build)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", ops_suite.GRAD_CASES[:2])
def test_opcheck(B, H, W, ws, padding, bias, cpu_build):
    ops_suite.test_opcheck(B, H, W, ws, padding, bias, cpu_build)


@pytest.mark.parametrize("padding", ["bias", "mask"])
def test_deterministic(padding, cpu_build):
    ops_suite.test_backward_is_deterministic(3, padding, cpu_build)


# (lead dims, heads, d, ws, padding): windows of several 64-token query and key blocks with edge
# windows on both axes at the configs' head dims (d = 32 and 64 on 64 padded channels, d = 80 on
# 128), ws larger than the map, a global map of 3 blocks
BLOCK_CASES = [
    pytest.param((1, 18, 30), 2, 32, 14, "bias", id="ws14-edges-d32"),
    pytest.param((2, 9, 11), 1, 64, 7, "bias", id="ws7-odd-d64"),
    pytest.param((1, 18, 30), 1, 64, 14, "mask", id="ws14-edges-mask"),
    pytest.param((1, 5, 6), 1, 80, 9, "bias", id="ws-gt-map-d80"),
    pytest.param((1, 2, 7, 10), 1, 16, None, "bias", id="video-global-140"),
]


@pytest.mark.parametrize("lead, heads, d, ws, padding", BLOCK_CASES)
def test_blocks_and_edges(lead, heads, d, ws, padding, cpu_build):
    triton_suite.check(lead, heads, d, ws, padding, backend=cpu_build)


def test_head_dims_past_the_tiles(cpu_build):
    """d = 136: the CUDA launcher refuses d > 128 by name (its tiles hold 128 channels); the host
    code, map and row math it shares with the CPU build take any d."""
    qkv = torch.randn(1, 2, 2, 3 * 136, dtype=F64)
    out = mixops.window_attention(qkv, num_heads=1, window_size=None, backend=cpu_build)
    want = ref.window_attention(qkv, 1, None, 136**-0.5, "bias", None)
    assert_close(out, want)


def test_bias_gradient_alone(cpu_build):
    """d qkv_bias without d qkv: the query-gradient kernel runs for the virtual key's partials only."""
    qkv = torch.randn(1, 18, 30, 3 * 32, dtype=F64)
    b = torch.randn(96, dtype=F64, requires_grad=True)
    out = mixops.window_attention(qkv, num_heads=1, window_size=14, qkv_bias=b, backend=cpu_build)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, b, g)
    br = b.detach().requires_grad_()
    (want,) = torch.autograd.grad(ref.window_attention(qkv, 1, 14, 32**-0.5, "bias", br), br, g)
    assert_close(got, want, name="grad qkv_bias")


def test_backward_entry_point_checks(cpu_build):
    qkv = torch.randn(1, 4, 4, 24, dtype=F64)
    bwd = torch.ops.mixops._window_attention_cuda_backward
    with pytest.raises(RuntimeError, match="needs must hold 2 flags"):
        bwd([torch.zeros(1, 4, 4, 8, dtype=F64)], [True], qkv, 2, 2, 0.5, "bias", None)
    with pytest.raises(RuntimeError, match="qkv_bias is None"):
        bwd([torch.zeros(1, 4, 4, 8, dtype=F64)], [True, True], qkv, 2, 2, 0.5, "bias", None)
    with pytest.raises(RuntimeError, match="padding must be"):
        torch.ops.mixops._window_attention_cuda(qkv, 2, 2, 0.5, "zeros", None)


# ---------------------------------------------------------------------------------------------
# The build's kernels (sm_90a SASS)
# ---------------------------------------------------------------------------------------------

# the engine tile each dtype's MMAs come from -> the instructions its kernels must hold
MATH_MUST = {
    "Sm80MmaIN7cutlass6half_t": [r"\bHMMA\.16816\.F32\b", r"\bLDSM\.16\.MT88", r"\bLDGSTS"],
    "Sm80MmaIN7cutlass10bfloat16_t": [r"\bHMMA\.16816\.F32\.BF16\b", r"\bLDSM\.16\.MT88", r"\bLDGSTS"],
    "Tf32Mma": [r"\bHMMA\.1688\.F32\.TF32\b", r"\bLDGSTS"],
    "SimtIfE": [r"\bFFMA\b", r"\bLDGSTS"],
    "SimtIdE": [r"\bDFMA\b", r"\bLDGSTS"],
}
assert set(MATH_MUST) == set(cuda_sass.ATTENTION_MATHS)


def test_build_has_every_kernel_with_its_instructions():
    """Three kernels x five maths x two padded head dims on sm_90a, each with its MMAs (mma.sync
    for fp16/bf16 and TF32, FMAs for IEEE fp32 and fp64), cp.async loads and ldmatrix(.trans)
    reads, no trap stand-in, and spills no larger than cuda_sass.ATTENTION_SPILL_LIMIT."""
    cuda_sass.extension_engine_sass()  # skips without an sm_90a build, or fails where CI expects one
    ext = pytest.importorskip("mixops._C")
    kernels = cuda_sass.object_sass(ext.__file__, lambda name: cuda_sass.attention_kernel(name) is not None)
    sm90 = {name: sass for (arch, name), sass in kernels.items() if arch == "sm_90a"}
    seen = set()
    for name, sass in sm90.items():
        kernel, math, dp = key = cuda_sass.attention_kernel(name)
        seen.add(key)
        for pattern in MATH_MUST[math]:
            assert re.search(pattern, sass), f"{kernel} {math} d{dp} lacks {pattern}"
        assert "BPT.TRAP" not in sass, f"{kernel} {math} d{dp} is a trap stand-in"
        assert not cuda_sass.spills(sass) or cuda_sass.known_spill(name, sass), f"{key} spills past the bound"
    assert seen == {(k, m, dp) for k in cuda_sass.ATTENTION_KERNELS for m in MATH_MUST for dp in (64, 128)}


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, heads, d, ws, padding", BLOCK_CASES)
def test_gpu_blocks_and_edges(lead, heads, d, ws, padding, dtype):
    triton_suite.check(lead, heads, d, ws, padding, dtype, "cuda", "cuda")


@pytest.mark.needs_cuda
def test_gpu_official_shapes():
    """UniFormer-S stage 3 (C = 320, 5 heads, d = 64) at ADE20K size 32 x 32 with ws 14 (edge
    windows on both axes) in bf16, and the global block, against the float64 reference."""
    for ws in (14, None):
        triton_suite.check((2, 32, 32), 5, 64, ws, "bias", torch.bfloat16, "cuda", "cuda")


@pytest.mark.needs_cuda
def test_cuda_small_case_for_compute_sanitizer():
    """One small call of the op and its backward on the GPU for every dtype, edge windows and ws >
    map; run this test alone under ``compute-sanitizer`` (memcheck, racecheck) to check the
    kernels' masks and barriers."""
    for dtype in (F64, torch.float32, torch.float16, torch.bfloat16):
        triton_suite.check((1, 9, 11), 2, 32, 7, "bias", dtype, "cuda", "cuda")
        triton_suite.check((1, 3, 4), 1, 16, 5, "mask", dtype, "cuda", "cuda")
