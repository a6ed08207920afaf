"""The CUDA backend of the fused ATMLayer's internal ops, ``_atm_means`` and ``_atm_mix``
(csrc/atm_layer.cu), through their CPU build.

On CPU tensors the extension's ``_atm_means_cuda`` / ``_atm_mix_cuda`` (+ backward) run
csrc/atm_layer_cpu.cpp: the same host functions (atm_layer.h) and maps as the CUDA build, each
GEMM run tile by tile on the engine's tiles by gemm/host_engine.h (the mix's three K segments
folded by alpha, the dalpha tile sums). These tests register that build as the ops' ``cuda``
backend for CPU tensors and run the backend suites of tests/test_atm_layer.py on it, plus shapes
whose GEMMs span several 128 x 128 tiles with images straddling row tiles, bf16 storage, and
ATMLayer / ActiveBlock taking the fused path on it. The kernels themselves run only in the
needs_cuda tests.
"""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.nn.atm import ActiveBlock, ATMLayer
from mixops.ops import atm_layer as OL
from mixops.reference import atm as R
from mixops_testing import assert_close, cpu_build_as_cuda

import cuda_sass
import test_atm_layer as suite
from test_atm_cases import KINDS

pytestmark = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)


@pytest.fixture
def cpu_build(monkeypatch):
    """The CPU build as the ``cuda`` backend of the internal ops and of the public ATM ops that the
    module resolves its path by."""
    return cpu_build_as_cuda(monkeypatch, "_atm_means", "_atm_mix", "atm_fc", "atm_sample")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", suite.CASES, ids=str)
def test_mix_forward_and_gradients(case, kind, cpu_build):
    suite.test_mix_forward_and_gradients(case, kind, cpu_build)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", suite.CASES, ids=str)
def test_means_forward_and_gradients(case, kind, cpu_build):
    suite.test_means_forward_and_gradients(case, kind, cpu_build)


def _check(backend, shape, share, dtype, device="cpu", c_out=None, accumulator_alpha=False):
    """Both internal ops and every gradient against the float64 reference; alpha in x's dtype, as
    the module's softmax gives it, or (accumulator_alpha) in fp32 / fp64."""
    inputs = suite._mix_inputs(shape, share, "normal1", dtype, c_out=c_out, device=device)
    if accumulator_alpha:
        inputs[8] = inputs[8].to(torch.promote_types(dtype, torch.float32))
    g = torch.randn(*shape[:3], inputs[3].shape[0], dtype=torch.float64).to(dtype).to(device)
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = OL.atm_mix(*leaves, share, backend=backend)
    got = torch.autograd.grad(out, leaves, g)
    ref, want = suite._reference_mix(inputs, g, share)
    assert_close(out, ref, dtype, name="mix")
    for name, a, e in zip(suite.MIX_INPUTS, got, want):
        assert_close(a, e, dtype, name=f"grad {name}")
    means = OL.atm_means(*leaves[:3], share, backend=backend)
    gm = torch.randn(means.shape, dtype=torch.float64)
    got = torch.autograd.grad(means, leaves[:3], gm.to(means))
    ref, want = suite._reference_means(inputs[:3], gm, share)
    assert_close(means, ref, dtype, name="means")
    for name, a, e in zip(suite.MIX_INPUTS[:3], got, want):
        assert_close(a, e, dtype, name=f"means grad {name}")


# (B, H, W, C, share, C_out): 336 pixels of 168 per image over three row tiles (images straddle
# them), C_out = 140 over two column tiles; a C_out below C
WIDE = [(2, 12, 14, 20, 4, 140), (3, 7, 9, 36, 2, 12)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", WIDE, ids=str)
def test_wide_shapes(case, dtype, cpu_build):
    *shape, share, c_out = case
    _check(cpu_build, shape, share, dtype, c_out=c_out, accumulator_alpha=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_in_the_storage_dtype(dtype, cpu_build):
    """The module's softmax gives alpha in x's dtype: the ops take it as it is."""
    _check(cpu_build, (2, 5, 6, 12), 4, dtype)


def test_mix_gradcheck(cpu_build):
    suite.test_mix_gradcheck(cpu_build)


def test_means_gradcheck(cpu_build):
    suite.test_means_gradcheck(cpu_build)


@pytest.mark.parametrize("with_bias", [True, False])
def test_mix_opcheck(with_bias, cpu_build):
    suite.test_mix_opcheck(with_bias, cpu_build)


def test_means_opcheck(cpu_build):
    suite.test_means_opcheck(cpu_build)


def test_mix_backward_subsets_are_the_full_backward(cpu_build):
    """Each flagged subset of the backward gives the bits of the full one (every flag alone)."""
    inputs, share = suite._tiny()
    inputs = [t.detach() for t in inputs]
    g = torch.randn(inputs[0].shape[:3] + (inputs[3].shape[0],), dtype=torch.float64)
    full = torch.ops.mixops._atm_mix_cuda_backward([g], [True] * 9, *inputs, share)
    for i in range(9):
        needs = [j == i for j in range(9)]
        (one,) = torch.ops.mixops._atm_mix_cuda_backward([g], needs, *inputs, share)
        assert torch.equal(one, full[i]), suite.MIX_INPUTS[i]


def test_atm_layer_and_block_take_the_cuda_path(monkeypatch, cpu_build):
    """ATMLayer and ActiveBlock on the cuda backend (its CPU build) take the fused path and match
    the official forward, every gradient included."""
    suite._no_unfused_path(monkeypatch)
    shape = (2, 5, 6, 12)
    B, H, W, C = shape
    m = ATMLayer(C)
    m.load_state_dict(suite._random_state(m), strict=True)
    m = m.double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    offset = (torch.randn(B, 2 * C, H, W, dtype=torch.float64) * 2).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    leaves = [x, offset, *m.parameters()]
    with mixops.use_backend(cpu_build):
        assert OL.fused_backend(x) == "cuda"
        out = m(x, offset)
        got = torch.autograd.grad(out, leaves, g)
    ref = R.atm_layer_forward(m, x, offset)
    want = torch.autograd.grad(ref, leaves, g)
    assert_close(out, ref, name="ATMLayer")
    for name, a, e in zip(["x", "offset"] + [n for n, _ in m.named_parameters()], got, want):
        assert_close(a, e, name=f"grad {name}")
    blk = ActiveBlock(8, share_dim=2, new_offset=True)
    blk.load_state_dict(suite._random_state(blk), strict=True)
    blk = blk.double()
    xb = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    with mixops.use_backend(cpu_build):
        out, off = blk(xb)
    ref_out, ref_off = R.active_block_forward(blk, xb)
    assert_close(out, ref_out, name="ActiveBlock")


# each GEMM of the two ops: the markers its sm_90a kernel names hold
LAYER_GEMMS = {
    "mix forward (3 K segments)": ("8StackedS", "8MixStore"),
    "mix dS_k": ("11LineOperand", "10PixelStore"),
    "mix dW_k (split-K)": ("11LineOperand", "11MatrixStore"),
    "mix dalpha_k (tile sums)": ("13AlphaGradSums",),
}


def test_build_runs_every_layer_gemm_on_the_engine():
    """Every GEMM of the fused ATMLayer ops is an engine kernel on sm_90a, one per (tile, dtype)
    and operand pair (test_gemm_engine.py checks every engine kernel's instructions and spills);
    no kernel calls the 64-bit division subroutine."""
    kernels = cuda_sass.extension_engine_sass("_atm_layer_cu_")
    sm90 = {name for arch, name in kernels if arch == "sm_90a"}
    for gemm, markers in LAYER_GEMMS.items():
        tiles = sorted(cuda_sass.engine_tile(n) for n in sm90 if all(m in n for m in markers))
        # dW and dalpha run once per S_k operand type (gathered, x)
        per_operand = 2 if gemm.startswith(("mix dW", "mix dalpha")) else 1
        assert tiles == sorted(["Simt", "Simt", "Sm90Wgmma", "Sm90Wgmma", "Tf32Mma"] * per_operand), (gemm, tiles)
    for (arch, name), sass in kernels.items():
        assert not cuda_sass.calls(sass), f"{name} on {arch} calls the 64-bit division subroutine"



@pytest.mark.needs_cuda
def test_cuda_small_case_for_compute_sanitizer():
    """One small call of both ops and their backward on the GPU, partial tiles on every edge,
    every dtype; run this test alone under ``compute-sanitizer`` (memcheck, racecheck) to check
    the kernels' masks, K segments, tile sums and barriers."""
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        _check("cuda", (2, 5, 6, 24), 8, dtype, "cuda")
