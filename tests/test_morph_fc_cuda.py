"""The CUDA backend of ``mixops.morph_fc`` (csrc/morph_fc.cu).

On CPU tensors the extension's ``_morph_fc_cuda`` / ``_morph_fc_cuda_backward`` run the CPU
emulation (csrc/morph_fc_cpu.cpp), which walks the SAME index map header as the GPU kernels
(csrc/morph_fc_map.cuh): those tests verify the gather / scatter math against the float64
reference. The tiling, shared-memory staging and tensor-core paths only run in the needs_cuda
tests.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import mixops
from mixops.reference import morph_fc as ref
from mixops_testing import assert_close, fp32_matmul

import cuda_sass

f64 = torch.float64

needs_extension = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)
pytestmark = needs_extension

# name -> (x shape, segment_dim, axis): every axis; chunks that wrap across rows (W=6, L=8);
# image (4-D) stage-1 channels C=84, L=14 with 2-row chunks; stage 4 C=588, L=49 at H=W=7 (one
# strided chunk); T > 1; temporal T=3 and the 16-frame group rule (C=56, G=8, T=8, F=56)
CASES = {
    "w-wrap": ((2, 3, 4, 6, 16), 8, "w"),
    "h-wrap": ((2, 3, 4, 6, 16), 8, "h"),
    "hs-wrap": ((2, 3, 4, 6, 16), 8, "hs"),
    "w-c84": ((2, 4, 7, 84), 14, "w"),
    "h-c84": ((2, 4, 7, 84), 14, "h"),
    "hs-c84": ((1, 2, 4, 7, 84), 14, "hs"),
    "hs-c588": ((2, 7, 7, 588), 49, "hs"),
    "h-c588": ((1, 7, 7, 588), 49, "h"),
    "t-3": ((2, 3, 2, 3, 8), 4, "t"),
    "t-8": ((1, 8, 2, 3, 56), 8, "t"),
}


def _width(shape, L, axis):
    return shape[1] * shape[-1] // L if axis == "t" else shape[-1]


def _make(shape, L, axis, dtype=f64, device="cpu", bias=True):
    n = _width(shape, L, axis)
    x = torch.randn(shape, dtype=f64)
    w = torch.randn(n, n, dtype=f64) / math.sqrt(n)
    b = torch.randn(n, dtype=f64) if bias else None
    return [t if t is None else t.to(dtype=dtype, device=device) for t in (x, w, b)]


def _reference_grads(x, w, b, g, L, axis):
    leaves = [t.detach().to(f64).cpu().requires_grad_() for t in (x, w, b) if t is not None]
    args = leaves if b is not None else [*leaves, None]
    out = ref.morph_fc(*args, L, axis)
    return out.detach(), torch.autograd.grad((out * g.to(f64).cpu()).sum(), leaves)


def _ops_grads(x, w, b, g, L, axis, needs=None):
    needs = needs or [True, True, b is not None]
    return torch.ops.mixops._morph_fc_cuda_backward([g], needs, x, w, b, L, axis)


# ---------------------------------------------------------------------------------------------
# CPU emulation: the kernels' index map against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
def test_emulation_forward_and_grads_match_reference(case, dtype, bias):
    shape, L, axis = CASES[case]
    x, w, b = _make(shape, L, axis, dtype, bias=bias)
    g = torch.randn(shape, dtype=dtype)
    out = torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis)
    expect, grads = _reference_grads(x, w, b, g, L, axis)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expect, dtype)
    got = _ops_grads(x, w, b, g, L, axis)
    assert len(got) == len(grads)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, grads):
        assert a.dtype == dtype
        assert_close(a, e, dtype, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulation_half_types_accumulate_in_fp32(dtype):
    shape, L, axis = CASES["h-c84"]
    x, w, b = _make(shape, L, axis, dtype)
    g = torch.randn(shape, dtype=dtype)
    expect, grads = _reference_grads(x, w, b, g, L, axis)
    assert_close(torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), expect, dtype)
    for a, e in zip(_ops_grads(x, w, b, g, L, axis), grads):
        assert_close(a, e, dtype)


@pytest.mark.parametrize("axis", ["w", "h", "hs", "t"])
def test_emulation_strided_inputs_and_expanded_grad(axis):
    """x as the channels-last view of [B, C, T, H, W] and as a channel slice; weight transposed
    view; bias strided; the incoming grad expanded (stride 0) as autograd hands it over."""
    (B, T, H, W, C), L, _ = CASES[f"{axis}-wrap" if axis != "t" else "t-3"]
    n = _width((B, T, H, W, C), L, axis)
    w = torch.randn(n, n, dtype=f64).t()
    b = torch.randn(2 * n, dtype=f64)[::2]
    g = torch.randn(1, 1, 1, 1, C, dtype=f64).expand(B, T, H, W, C)
    for x in (
        torch.randn(B, C, T, H, W, dtype=f64).permute(0, 2, 3, 4, 1),
        torch.randn(B, T, H, W, C + 3, dtype=f64)[..., 2 : 2 + C],
    ):
        assert not x.is_contiguous()
        expect, grads = _reference_grads(x, w, b, g, L, axis)
        assert_close(torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), expect)
        for a, e in zip(_ops_grads(x, w, b, g, L, axis), grads):
            assert_close(a, e)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=3)])
def test_emulation_needs_mask(needs):
    """Only the flagged grads come back, in schema order (x, weight, bias)."""
    shape, L, axis = CASES["w-wrap"]
    x, w, b = _make(shape, L, axis)
    g = torch.randn(shape, dtype=f64)
    _, grads = _reference_grads(x, w, b, g, L, axis)
    got = _ops_grads(x, w, b, g, L, axis, list(needs))
    want = [e for e, flag in zip(grads, needs) if flag]
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert_close(a, e)


def test_emulation_without_bias_needs_no_bias_grad():
    shape, L, axis = CASES["t-3"]
    x, w, _ = _make(shape, L, axis, bias=False)
    g = torch.randn(shape, dtype=f64)
    _, (gx, gw) = _reference_grads(x, w, None, g, L, axis)
    got = _ops_grads(x, w, None, g, L, axis, [True, True, False])
    assert len(got) == 2
    assert_close(got[0], gx)
    assert_close(got[1], gw)


def test_emulation_empty_batch():
    x, w, b = _make((0, 4, 6, 16), 8, "w")
    assert torch.ops.mixops._morph_fc_cuda(x, w, b, 8, "w").shape == x.shape
    gx, gw, gb = _ops_grads(x, w, b, torch.zeros_like(x), 8, "w")
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


X = torch.randn(2, 3, 4, 6, 16)
W16 = torch.randn(16, 16)
B16 = torch.randn(16)


def _fwd(x=X, w=W16, b=None, L=8, axis="w"):
    return torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis)


def _bwd(grads=(X,), needs=(True, True, False), x=X, w=W16, b=None, L=8, axis="w"):
    return torch.ops.mixops._morph_fc_cuda_backward(list(grads), list(needs), x, w, b, L, axis)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: _fwd(axis="c"), "axis must be one of"),
        (lambda: _fwd(x=X.long(), w=W16.long()), "x must be float32, float16, bfloat16 or float64"),
        (lambda: _fwd(x=X[0, 0]), "x must be \\[B, H, W, C\\] or \\[B, T, H, W, C\\], got 3"),
        (lambda: _fwd(x=X[:, 0], w=torch.randn(8, 8), L=4, axis="t"), "x must be \\[B, T, H, W, C\\] for axis 't'"),
        (lambda: _fwd(L=0), "segment_dim must be positive"),
        (lambda: _fwd(L=6), r"x channels \(16\) must be divisible by segment_dim \(6\)"),
        (lambda: _fwd(x=torch.randn(2, 5, 5, 16)), r"H\*W \(25\) must be divisible by segment_dim \(8\)"),
        (lambda: _fwd(w=torch.randn(16, 8)), r"weight must have shape \(16, 16\)"),
        (lambda: _fwd(w=W16.double()), "weight must have the dtype of x"),
        (lambda: _fwd(b=torch.randn(15)), r"bias must have shape \(16,\)"),
        (lambda: _fwd(b=B16.double()), "bias must have the dtype of x"),
        (lambda: _fwd(L=4, axis="t"), r"weight must have shape \(12, 12\)"),
        (lambda: _bwd(grads=(X, X)), "grads must hold one tensor"),
        (lambda: _bwd(needs=(True, True)), "needs must hold 3 flags"),
        (lambda: _bwd(needs=(False, False, True)), "needs\\[2\\] \\(bias\\) is set but bias is None"),
        (lambda: _bwd(grads=(X[:1],)), "grads\\[0\\] must have the shape of x"),
        (lambda: _bwd(grads=(X.double(),)), "grads\\[0\\] must have the dtype of x"),
    ],
)
def test_bad_input_raises_torch_check(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# the fused layer's operand types, in kernel names
FUSED_OPERANDS = ("13MixedBranches", "13ChunkPlusMean", "11BranchStore", "13ProjGradStore")


def test_build_runs_every_gemm_on_the_engine():
    """MorphFC's GEMMs are the shared engine's kernels (tests/test_gemm_engine.py checks their
    instructions): on sm_90a, the forward/dX GEMM (the chunk map as a K-major A, the weight as B,
    the scatter store) and the dW GEMM (both operands the transposed map, split-K partials), for
    fp16 and bf16 on wgmma, fp32 on TF32 and on IEEE FMAs, fp64. The map divides through
    Dividers: no kernel calls nvcc's 64-bit division subroutine (a CALL in the mainloop makes
    ptxas save the accumulators around it)."""
    kernels = cuda_sass.extension_engine_sass("8morph_fc")
    # (the fused layer's kernels share the namespace: tests/test_morph_fc_fused_cuda.py)
    sm90 = {name for arch, name in kernels if arch == "sm_90a" and not any(f in name for f in FUSED_OPERANDS)}
    forward = {n for n in sm90 if "10ChunkStore" in n}
    weight = {n for n in sm90 if "MatrixStore" in n}
    # one kernel per (tile, dtype): bf16 and fp16 on wgmma, TF32, IEEE fp32 and fp64 on FMAs
    for names in (forward, weight):
        assert len(names) == 5 and sorted(cuda_sass.engine_tile(n) for n in names) == [
            "Simt", "Simt", "Sm90Wgmma", "Sm90Wgmma", "Tf32Mma"], sorted(sm90)
    for (arch, name), sass in kernels.items():
        assert not cuda_sass.calls(sass), f"{name} on {arch} calls the 64-bit division subroutine"


# ---------------------------------------------------------------------------------------------
# GPU: the kernels themselves
# ---------------------------------------------------------------------------------------------

# The official image stage shapes (MorphMLP-T: C = 84, 168, 336, 588; L = 14, 28, 28, 49 at
# 56, 28, 14, 7 px; stage 4 is the strided "hs" branch) at B = 2, and video stage shapes with
# the temporal branch (16-frame G = 8; 32-frame stage 3 C = 392, G = 14, T = 16 -> F = 448).
STAGES = {
    "s1-w": ((2, 56, 56, 84), 14, "w"),
    "s1-h": ((2, 56, 56, 84), 14, "h"),
    "s2-w": ((2, 28, 28, 168), 28, "w"),
    "s3-h": ((2, 14, 14, 336), 28, "h"),
    "s3-w": ((2, 14, 14, 336), 28, "w"),
    "s4-hs": ((2, 7, 7, 588), 49, "hs"),
    "v1-t": ((1, 8, 14, 14, 112), 8, "t"),
    "v3-t32": ((1, 16, 7, 7, 392), 14, "t"),
    "v3-w": ((1, 8, 14, 14, 392), 28, "w"),
}
# fp64 runs the SIMT path with fp64 accumulators: it must meet the float64 tolerance (1e-10)
GPU_DTYPES = [f64, torch.float32, torch.float16, torch.bfloat16]
# tiny shapes for gradcheck (every wrap / group rule still taken: W=3 with L=2, T=3 with G=2)
TINY = {
    "w": ((1, 2, 2, 3, 4), 2, "w"),
    "h": ((1, 2, 2, 3, 4), 2, "h"),
    "hs": ((1, 2, 2, 3, 4), 2, "hs"),
    "t": ((1, 3, 1, 2, 4), 2, "t"),
}


def _poison_cache(numel: int, dtype: torch.dtype) -> None:
    # leave NaN in the caching allocator's free blocks, so an output element the kernel fails to
    # write shows up as NaN (assert_close rejects non-finite values)
    torch.full((4 * numel + 4096,), float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("stage", list(STAGES) + list(CASES))
def test_cuda_matches_reference(stage, dtype):
    shape, L, axis = STAGES.get(stage) or CASES[stage]
    x, w, b = _make(shape, L, axis, dtype, "cuda")
    g = torch.randn(shape, dtype=dtype, device="cuda")
    expect, grads = _reference_grads(x, w, b, g, L, axis)
    _poison_cache(x.numel(), dtype)
    out = mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend="cuda")
    assert out.is_cuda and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expect, dtype)
    _poison_cache(x.numel(), dtype)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), _ops_grads(x, w, b, g, L, axis), grads):
        assert_close(a, e, dtype, name=name)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("api,value", [("allow_tf32", True), ("fp32_precision", "tf32")])
@pytest.mark.parametrize("stage", ["s1-w", "s4-hs", "v3-t32"])
def test_cuda_fp32_tf32_when_torch_allows_it(stage, api, value):
    """With TF32 allowed for matmuls -- by the legacy flag, or by the fp32_precision API alone,
    which leaves the legacy flag disagreeing -- the fp32 path runs on TF32 tensor cores (10-bit
    mantissa, the precision of fp16), like torch's own fp32 Linear: within the fp16 tolerance and
    not bit-equal to the IEEE fp32 result (db is a plain column sum either way)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 tensor cores need sm_80+; sm_75 runs IEEE fp32 either way")
    shape, L, axis = STAGES[stage]
    x, w, b = _make(shape, L, axis, torch.float32, "cuda")
    g = torch.randn(shape, device="cuda")
    expect, grads = _reference_grads(x, w, b, g, L, axis)
    with fp32_matmul("fp32_precision", "ieee"):
        ieee = [torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), *_ops_grads(x, w, b, g, L, axis)]
    with fp32_matmul(api, value):
        tf32 = [torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), *_ops_grads(x, w, b, g, L, axis)]
    for name, a, e, i in zip(("output", "grad x", "grad weight", "grad bias"), tf32, (expect, *grads), ieee):
        assert_close(a, e, torch.float16, name=name)
        assert name == "grad bias" or not torch.equal(a, i), f"{name}: TF32 was allowed but not used"


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("axis", ["w", "h", "hs", "t"])
def test_cuda_strided_inputs_and_expanded_grad(axis, dtype):
    (B, T, H, W, C), L, _ = CASES[f"{axis}-wrap" if axis != "t" else "t-8"]
    n = _width((B, T, H, W, C), L, axis)
    w = (torch.randn(n, n, dtype=f64) / math.sqrt(n)).to(dtype=dtype, device="cuda").t()
    b = torch.randn(2 * n, dtype=dtype, device="cuda")[::2]
    g = torch.randn(1, 1, 1, 1, C, dtype=dtype, device="cuda").expand(B, T, H, W, C)
    for x in (
        torch.randn(B, C, T, H, W, dtype=dtype, device="cuda").permute(0, 2, 3, 4, 1),
        torch.randn(B, T, H, W, C + 3, dtype=dtype, device="cuda")[..., 2 : 2 + C],
    ):
        expect, grads = _reference_grads(x, w, b, g, L, axis)
        assert_close(torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), expect, dtype)
        for a, e in zip(_ops_grads(x, w, b, g, L, axis), grads):
            assert_close(a, e, dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("stage", ["s1-h", "s4-hs", "v1-t"])
def test_cuda_backward_deterministic(stage, dtype):
    """Large M, so dW/db are split over several row ranges: still bit-identical twice."""
    shape, L, axis = STAGES[stage]
    x, w, b = _make(shape, L, axis, dtype, "cuda")
    g = torch.randn(shape, dtype=dtype, device="cuda")
    first = [torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), *_ops_grads(x, w, b, g, L, axis)]
    second = [torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), *_ops_grads(x, w, b, g, L, axis)]
    for name, a, c in zip(("output", "grad x", "grad weight", "grad bias"), first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


@pytest.mark.needs_cuda
def test_cuda_runs_on_the_inputs_device_not_the_current_one():
    """Inputs on cuda:1 while cuda:0 is current: every entry point (forward, backward) launches
    under the inputs' device and its stream (the CUDAGuard), not on the current device."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (inputs on cuda:1, cuda:0 current); this machine has {torch.cuda.device_count()}")
    shape, L, axis = CASES["h-c84"]
    with torch.cuda.device(0):
        x, w, b = (t.requires_grad_() for t in _make(shape, L, axis, torch.float32, "cuda:1"))
        out = mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend="cuda")
        g = torch.randn_like(out)
        got = torch.autograd.grad((out * g).sum(), (x, w, b))
        assert torch.cuda.current_device() == 0
    expect, grads = _reference_grads(x, w, b, g, L, axis)
    assert out.device == x.device
    assert_close(out, expect, torch.float32)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, grads):
        assert a.device == x.device
        assert_close(a, e, torch.float32, name=name)


@pytest.mark.needs_cuda
def test_cuda_autograd_through_the_public_op():
    shape, L, axis = CASES["h-c84"]
    x, w, b = (t.requires_grad_() for t in _make(shape, L, axis, torch.float32, "cuda"))
    out = mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend="cuda")
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (x, w, b))
    _, grads = _reference_grads(x, w, b, g, L, axis)
    for a, e in zip(got, grads):
        assert_close(a, e, torch.float32)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("axis", list(TINY))
def test_cuda_gradcheck_fp64(axis, bias):
    """The full Jacobian of the public op on the cuda backend (fp64 storage and accumulation),
    so every backward path (dX, dW, db) is checked against finite differences on the GPU."""
    shape, L, _ = TINY[axis]
    x, w, b = (t if t is None else t.requires_grad_() for t in _make(shape, L, axis, f64, "cuda", bias))
    assert torch.autograd.gradcheck(
        lambda x, w, b: mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend="cuda"), (x, w, b)
    )


@pytest.mark.needs_cuda
def test_cuda_small_case_for_compute_sanitizer():
    """A few blocks with partial tiles on every edge; run this test alone under
    ``compute-sanitizer --tool memcheck`` (and ``--tool racecheck``) to check the kernels'
    masks and barriers."""
    shape, L, axis = CASES["w-wrap"]
    for dtype in GPU_DTYPES:
        x, w, b = _make(shape, L, axis, dtype, "cuda")
        g = torch.randn(shape, dtype=dtype, device="cuda")
        expect, grads = _reference_grads(x, w, b, g, L, axis)
        assert_close(torch.ops.mixops._morph_fc_cuda(x, w, b, L, axis), expect, dtype)
        for a, e in zip(_ops_grads(x, w, b, g, L, axis), grads):
            assert_close(a, e, dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: _fwd(x=X.cuda(), w=W16), "weight must be on the device of x"),
        (lambda: _fwd(x=X.cuda(), w=W16.cuda(), b=B16), "bias must be on the device of x"),
        (lambda: _fwd(x=X, w=W16.cuda()), "x must be a CUDA tensor"),
        (lambda: _bwd(grads=(X,), x=X.cuda(), w=W16.cuda()), "grads\\[0\\] must be on the device of x"),
    ],
)
def test_cuda_bad_input_raises_torch_check(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
