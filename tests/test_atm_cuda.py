"""The CUDA ATM ops (``csrc/atm.cu``: ``torch.ops.mixops._atm_sample_cuda``, ``_atm_fc_cuda``
and their backwards) beyond the generic op tests.

On CPU tensors the same ops run the CPU emulation (``csrc/atm_cpu.cpp``), which loops over the
very functions the CUDA kernels call (``csrc/atm_math.cuh``: positions, corners, zero padding,
the slope rule, the owner-computes backward walk): those tests check the GPU's index math
against the float64 reference and torchvision's deform_conv2d, for every offset distribution,
share, axis, awkward sizes, strided and expanded inputs, the ``needs`` subsets and the argument
checks. The ``needs_cuda`` tests run the kernels themselves (tiling, shared memory, tensor
cores): dtypes, the ActiveMLP-T stage shapes, a prime batch, determinism, a line long enough
for the opt-in shared memory, inputs off the current device, and a small compute-sanitizer case.
Two tests read the built device code (cuobjdump, no GPU): tensor-core MMAs in the sm_80+ bf16/TF32
GEMMs, no sm_90a spills, and no 64-bit division sequence in any kernel.
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch
import cuda_sass
from mixops_testing import assert_close, fp32_matmul
from test_atm_cases import KINDS, away_from_integers, official_atm_op, strided_inputs

import mixops
from mixops.backend import implementation
from mixops.reference import atm as R

pytestmark = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)

AXES = ("h", "w")
SHARES = (1, 2, 4, 8)
AWKWARD = (3, 5, 11, 24)  # B, H, W, C: no block multiple, C divisible by every share
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    return torch.ops.mixops


def _fc_params(C, c_out, dtype=torch.float64, device="cpu"):
    """A transposed weight and a strided bias."""
    w = (torch.randn(C, c_out, dtype=torch.float64) / C**0.5).to(dtype).t()
    b = torch.randn(2 * c_out, dtype=torch.float64).to(dtype)[::2]
    return w.to(device), b.to(device)


def _reference_sample(x, off, g, axis, share):
    """Float64 output and (gx, goff) of the reference, from the values the kernel sees."""
    xr = x.detach().double().cpu().requires_grad_()
    orr = off.detach().double().cpu().requires_grad_()
    out = R.atm_sample_lerp(xr, orr, axis, share)
    return (out.detach(), *torch.autograd.grad(out, (xr, orr), g.double().cpu()))


def _reference_fc(x, off, w, b, g, axis, share):
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, off, w, b)]
    out = R.atm_fc_lerp(*leaves, axis, share)
    return (out.detach(), *torch.autograd.grad(out, leaves, g.double().cpu()))


def _expanded_grad(shape, dtype=torch.float64, device="cpu"):
    """A zero-stride incoming gradient along H, as autograd hands out for a sum over it."""
    B, H, W, C = shape
    return torch.randn(B, 1, W, C, dtype=torch.float64).to(dtype).to(device).expand(B, H, W, C)


def _exact(kind):
    return kind in ("integer", "edges")


# --- CPU emulation: the GPU's index math against the float64 reference ------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("axis", AXES)
def test_sample_forward_and_backward_match_reference(axis, share, kind):
    x, off = strided_inputs(AWKWARD, share, axis, kind)
    g = _expanded_grad(AWKWARD)
    out = _ops()._atm_sample_cuda(x, off, axis, share)
    gx, go = _ops()._atm_sample_cuda_backward([g], [True, True], x, off, axis, share)
    ref, rgx, rgo = _reference_sample(x, off, g, axis, share)
    if _exact(kind):
        assert torch.equal(out, ref)  # exact integers copy, -1 and n give exact zeros
    else:
        assert_close(out, ref, name="out")
    assert_close(gx, rgx, name="grad x")
    assert_close(go, rgo, name="grad offset")


@pytest.mark.parametrize("share", [1, 3, 8])
@pytest.mark.parametrize("axis", AXES)
def test_sample_float32_matches_reference(axis, share):
    """fp32 storage, fp32 positions and accumulation, as on the GPU."""
    x, off = strided_inputs(AWKWARD, share, axis, "normal5", torch.float32)
    g = torch.randn(AWKWARD, dtype=torch.float32)
    out = _ops()._atm_sample_cuda(x, off, axis, share)
    gx, go = _ops()._atm_sample_cuda_backward([g], [True, True], x, off, axis, share)
    ref, rgx, rgo = _reference_sample(x, off, g, axis, share)
    assert out.dtype == gx.dtype == go.dtype == torch.float32
    assert_close(out, ref, name="out")
    assert_close(gx, rgx, name="grad x")
    assert_close(go, rgo, name="grad offset")


@pytest.mark.parametrize("axis", AXES)
def test_sample_positions_are_fp32_for_half_storage(axis):
    """Half offsets near the far end of a line keep their fraction (fp16 alone resolves only
    ~1/32 px at p ~ 32-64), as the GPU computes positions in fp32."""
    shape = (1, 60, 60, 4)
    x = torch.randn(shape, dtype=torch.float64).half()
    off = (torch.rand(shape, dtype=torch.float64) * 0.9 + 0.05).half()
    out = _ops()._atm_sample_cuda(x, off, axis, 1)
    assert_close(out, R.atm_sample_lerp(x.double(), off.double(), axis, 1), torch.float16, name="fp16 out")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share", [1, 4])
@pytest.mark.parametrize("axis", AXES)
def test_matches_torchvision_deform_conv2d(axis, share, kind):
    """Both ops against deform_conv2d as the official ATMOp drives it, in float64, gradients
    included: right-hand slope at integers, x[0] at p = -1, nothing from outside."""
    pytest.importorskip("torchvision")
    B, H, W, C, c_out = 2, 4, 6, 8, 5
    x, off = strided_inputs((B, H, W, C), share, axis, kind)
    w, b = _fc_params(C, c_out)
    leaves = [t.detach().clone().requires_grad_() for t in (x, off, w, b)]
    xt, ot, wt, bt = leaves

    def official(weight, bias):
        full = ot.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)
        return official_atm_op(xt.permute(0, 3, 1, 2), full, weight, bias, axis).permute(0, 2, 3, 1)

    g = torch.randn(B, H, W, C, dtype=torch.float64)
    eye = torch.eye(C, dtype=torch.float64)[:, :, None, None]
    tv = official(eye, None)
    want = torch.autograd.grad(tv, (xt, ot), g)
    out = _ops()._atm_sample_cuda(x, off, axis, share)
    got = _ops()._atm_sample_cuda_backward([g], [True, True], x, off, axis, share)
    if _exact(kind):
        assert torch.equal(out, tv.detach())
    else:
        assert_close(out, tv, name="sample out")
    for name, a, e in zip(("x", "offset"), got, want):
        assert_close(a, e, name=f"sample grad {name}")

    gy = torch.randn(B, H, W, c_out, dtype=torch.float64)
    tv = official(wt[:, :, None, None], bt)
    want = torch.autograd.grad(tv, leaves, gy)
    out = _ops()._atm_fc_cuda(x, off, w, b, axis, share)
    got = _ops()._atm_fc_cuda_backward([gy], [True] * 4, x, off, w, b, axis, share)
    assert_close(out, tv, name="fc out")
    for name, a, e in zip(("x", "offset", "weight", "bias"), got, want):
        assert_close(a, e, name=f"fc grad {name}")


@pytest.mark.parametrize("share", [1, 2, 3, 8])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fc_matches_reference(dtype, axis, share):
    """Awkward C and C_out, transposed weight, strided bias, expanded incoming gradient; a share
    that is no power of two takes the general path of the kernels' channel -> group Divider."""
    c_out = 13
    x, off = strided_inputs(AWKWARD, share, axis, "normal1", dtype)
    w, b = _fc_params(AWKWARD[-1], c_out, dtype)
    g = _expanded_grad((*AWKWARD[:-1], c_out), dtype)
    out = _ops()._atm_fc_cuda(x, off, w, b, axis, share)
    got = _ops()._atm_fc_cuda_backward([g], [True] * 4, x, off, w, b, axis, share)
    want = _reference_fc(x, off, w, b, g, axis, share)
    assert out.dtype == dtype and out.shape == (*AWKWARD[:-1], c_out)
    for name, a, e in zip(("out", "x", "offset", "weight", "bias"), (out, *got), want):
        assert a.dtype == dtype
        assert_close(a, e, name=name)
    no_bias = _ops()._atm_fc_cuda(x, off, w, None, axis, share)
    assert_close(no_bias, R.atm_fc_lerp(x.double(), off.double(), w.double(), None, axis, share), name="no bias")


def test_sample_needs_subsets():
    """Each subset of `needs` returns exactly the flagged gradients, equal to the full run's."""
    x, off = strided_inputs(AWKWARD, 4, "w", "normal5")
    g = torch.randn(AWKWARD, dtype=torch.float64)
    full = _ops()._atm_sample_cuda_backward([g], [True, True], x, off, "w", 4)
    for needs in itertools.product([False, True], repeat=2):
        got = _ops()._atm_sample_cuda_backward([g], list(needs), x, off, "w", 4)
        want = [t for t, n in zip(full, needs) if n]
        assert len(got) == len(want)
        for a, e in zip(got, want):
            assert torch.equal(a, e)


def test_fc_needs_subsets():
    x, off = strided_inputs(AWKWARD, 2, "h", "normal5")
    w, b = _fc_params(AWKWARD[-1], 6)
    g = torch.randn(*AWKWARD[:-1], 6, dtype=torch.float64)
    full = _ops()._atm_fc_cuda_backward([g], [True] * 4, x, off, w, b, "h", 2)
    for needs in itertools.product([False, True], repeat=4):
        got = _ops()._atm_fc_cuda_backward([g], list(needs), x, off, w, b, "h", 2)
        want = [t for t, n in zip(full, needs) if n]
        assert len(got) == len(want)
        for a, e in zip(got, want):
            assert torch.equal(a, e)


@pytest.mark.parametrize("axis", AXES)
def test_gradcheck_of_the_emulated_backward(axis):
    """The backward op is the derivative of the forward op (gradcheck, fp64, CPU emulation,
    wrapped in an autograd.Function since the cuda backend itself takes only CUDA tensors)."""

    class Sample(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, off):
            ctx.save_for_backward(x, off)
            return _ops()._atm_sample_cuda(x, off, axis, 2)

        @staticmethod
        def backward(ctx, g):
            x, off = ctx.saved_tensors
            return tuple(_ops()._atm_sample_cuda_backward([g], [True, True], x, off, axis, 2))

    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    off = away_from_integers((1, 3, 4, 2)).requires_grad_()
    assert torch.autograd.gradcheck(Sample.apply, (x, off))


def test_empty_and_degenerate_shapes():
    for shape in [(0, 3, 4, 8), (2, 1, 1, 8), (2, 3, 1, 4)]:
        x = torch.randn(shape, dtype=torch.float64)
        off = torch.randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64)
        for axis in AXES:
            out = _ops()._atm_sample_cuda(x, off, axis, 2)
            assert_close(out, R.atm_sample_lerp(x, off, axis, 2), name=f"{shape} {axis}")


def test_registered_as_cuda_backend_not_auto():
    for op in ("atm_sample", "atm_fc"):
        assert "cuda" in mixops.available_backends(op)
        impl = implementation(op, "cuda")
        assert impl.auto is False
        assert not impl.supports(torch.empty(0))


# --- argument checks of the C++ ops ------------------------------------------------------------


def _good():
    x = torch.randn(2, 3, 4, 8)
    return x, torch.randn(2, 3, 4, 4), torch.randn(5, 8), torch.randn(5)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(x=a["x"][0]), "x must be"),
        (lambda a: a.update(offset=a["offset"][0]), "offset must be"),
        (lambda a: a.update(offset=torch.randn(2, 3, 4, 8)), "offset must have shape"),
        (lambda a: a.update(offset=torch.randn(2, 4, 3, 4)), "offset must have shape"),
        (lambda a: a.update(offset=a["offset"].double()), "offset must have the dtype of x"),
        (lambda a: a.update(x=a["x"].long(), offset=a["offset"].long()), "x must be float32, float16, bfloat16 or"),
        (lambda a: a.update(axis="c"), "axis must be"),
        (lambda a: a.update(share=3), "divisible by share"),
        (lambda a: a.update(share=0), "share must be"),
    ],
)
def test_gather_checks(change, match):
    x, off, w, b = _good()
    args = {"x": x, "offset": off, "axis": "w", "share": 2}
    change(args)
    call = (args["x"], args["offset"])
    tail = (args["axis"], args["share"])
    with pytest.raises(RuntimeError, match=match):
        _ops()._atm_sample_cuda(*call, *tail)
    with pytest.raises(RuntimeError, match=match):
        _ops()._atm_fc_cuda(*call, w, b, *tail)
    with pytest.raises(RuntimeError, match=match):
        _ops()._atm_sample_cuda_backward([torch.randn(2, 3, 4, 8)], [True, True], *call, *tail)


def test_fc_and_grad_checks():
    x, off, w, b = _good()
    with pytest.raises(RuntimeError, match="weight must be"):
        _ops()._atm_fc_cuda(x, off, torch.randn(5, 7), b, "h", 2)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        _ops()._atm_fc_cuda(x, off, w.double(), b, "h", 2)
    with pytest.raises(RuntimeError, match="bias must be"):
        _ops()._atm_fc_cuda(x, off, w, torch.randn(4), "h", 2)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        _ops()._atm_fc_cuda(x, off, w, b.half(), "h", 2)
    g = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="expected 1 incoming gradient"):
        _ops()._atm_fc_cuda_backward([g, g], [True] * 4, x, off, w, b, "h", 2)
    with pytest.raises(RuntimeError, match="expected 4 needs flags"):
        _ops()._atm_fc_cuda_backward([g], [True] * 2, x, off, w, b, "h", 2)
    with pytest.raises(RuntimeError, match="output's shape"):
        _ops()._atm_fc_cuda_backward([torch.randn(2, 3, 4, 8)], [True] * 4, x, off, w, b, "h", 2)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the dtype of x"):
        _ops()._atm_fc_cuda_backward([g.double()], [True] * 4, x, off, w, b, "h", 2)


# --- the device code of the build (no GPU needed) ---------------------------------------------


def test_build_runs_every_gemm_on_the_engine():
    """ATM's GEMMs are the shared engine's kernels (tests/test_gemm_engine.py checks their
    instructions, spills and traps): on sm_90a, atm_fc forward (the lerp gather as a computed
    K-major A, the weight as B, the pixel store), dS (g as A, W^T as B: no cuBLAS) and dW (g^T as
    A, the gather as a computed Rows-major B, split-K partials), each for fp16 and bf16 on wgmma,
    fp32 on TF32 and IEEE FMAs, and fp64."""
    kernels = cuda_sass.extension_engine_sass("_atm_cu_")
    sm90 = {name for arch, name in kernels if arch == "sm_90a"}
    forward = {n for n in sm90 if "GatheredS" in n and "PixelStore" in n}
    ds = {n for n in sm90 if "LineOperand" in n and "PixelStore" in n}
    dw = {n for n in sm90 if "GatheredS" in n and "MatrixStore" in n}
    for names in (forward, ds, dw):
        assert len(names) == 5 and sorted(cuda_sass.engine_tile(n) for n in names) == [
            "Simt", "Simt", "Sm90Wgmma", "Sm90Wgmma", "Tf32Mma"], sorted(sm90)


def test_build_has_no_64_bit_division_in_the_kernels():
    """Every index division of the ATM kernels (pixel -> line and position, line -> image,
    channel -> offset group c / share) goes through a csrc/common.cuh Divider: a multiply-high
    and two shifts. No kernel keeps nvcc's 64-bit `/` or `%` sequence, recognisable by its
    out-of-line subroutine (cuda_sass.calls)."""
    ext = pytest.importorskip("mixops._C", reason="the CUDA extension is not built")
    kernels = cuda_sass.object_sass(ext.__file__, lambda n: "_atm_cu_" in n)
    hot = {name for _, name in kernels if re.search(r"atm_sample_fwd_kernel|gathered_gemm_kernel.*GatheredS", name)}
    assert len(hot) == 4 + 5 + 5, sorted(hot)  # sample: per dtype; forward and dW: per engine tile and dtype
    for (arch, name), sass in kernels.items():
        assert not cuda_sass.calls(sass), f"{name} on {arch} calls the 64-bit division subroutine"
    for name in hot:
        assert any("IMAD.WIDE" in sass or "IMAD.HI" in sass for (a, n), sass in kernels.items() if n == name), name


# --- the CUDA kernels (GPU) -------------------------------------------------------------------

needs_cuda = pytest.mark.needs_cuda


def _poison(*tensors):
    """Hand the CUDA caching allocator NaN-filled blocks of these tensors' sizes: the op's fresh
    outputs of the same sizes reuse them, so an element a kernel leaves unwritten shows as NaN."""
    blocks = [torch.full((t.numel(),), float("nan"), dtype=t.dtype, device="cuda") for t in tensors]
    del blocks


def _gpu_check_sample(shape, share, axis, kind, dtype, g_expanded=False):
    x, off = strided_inputs(shape, share, axis, kind, dtype, "cuda")
    g = _expanded_grad(shape, dtype, "cuda") if g_expanded else torch.randn(shape, dtype=torch.float64).to("cuda", dtype)
    xl, ol = x.detach().requires_grad_(), off.detach().requires_grad_()
    _poison(x)
    out = mixops.atm_sample(xl, ol, axis=axis, share=share, backend="cuda")
    _poison(x, off)
    gx, go = torch.autograd.grad(out, (xl, ol), g)
    ref, rgx, rgo = _reference_sample(x, off, g, axis, share)
    for name, a, e in (("out", out, ref), ("grad x", gx, rgx), ("grad offset", go, rgo)):
        assert a.dtype == dtype and a.is_cuda
        assert_close(a, e, dtype, name=f"{name} {tuple(shape)} share={share} {axis}")


def _gpu_check_fc(shape, c_out, share, axis, kind, dtype):
    x, off = strided_inputs(shape, share, axis, kind, dtype, "cuda")
    w, b = _fc_params(shape[-1], c_out, dtype, "cuda")
    g = torch.randn(*shape[:-1], c_out, dtype=torch.float64).to("cuda", dtype)
    leaves = [t.detach().requires_grad_() for t in (x, off, w, b)]
    _poison(g)
    out = mixops.atm_fc(*leaves, axis=axis, share=share, backend="cuda")
    _poison(x, off, w, b)
    got = torch.autograd.grad(out, leaves, g)
    want = _reference_fc(x, off, w, b, g, axis, share)
    for name, a, e in zip(("out", "x", "offset", "weight", "bias"), (out, *got), want):
        assert a.dtype == dtype and a.is_cuda
        assert_close(a, e, dtype, name=f"fc {name} {tuple(shape)} share={share} {axis}")


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("axis", AXES)
def test_gpu_sample_matches_reference(axis, share, dtype):
    for kind in KINDS:
        _gpu_check_sample(AWKWARD, share, axis, kind, dtype, g_expanded=kind == "normal1")


@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("share", [1, 4])
@pytest.mark.parametrize("axis", AXES)
def test_gpu_fc_matches_reference(axis, share, dtype):
    # several 64x64 tiles and a ragged last one in every dimension: M = 3·5·11, C = 72, C_out = 70
    _gpu_check_fc((3, 5, 11, 72), 70, share, axis, "normal5", dtype)
    _gpu_check_fc(AWKWARD, 13, share, axis, "edges", dtype)


@needs_cuda
@pytest.mark.parametrize("api,value", [("allow_tf32", True), ("fp32_precision", "tf32")])
def test_gpu_fc_tf32_when_torch_allows_it(api, value):
    """fp32 with TF32 allowed for torch's matmuls -- by the legacy flag, or by fp32_precision
    alone -- takes the tensor-core path: within TF32's ~fp16 accuracy, and not bit-equal to the
    IEEE fp32 result (so the test fails if TF32 never ran)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("TF32 tensor cores need sm_80+")
    x, off = strided_inputs((3, 5, 11, 72), 2, "w", "normal1", torch.float32, "cuda")
    w, b = _fc_params(72, 70, torch.float32, "cuda")
    ieee = mixops.atm_fc(x, off, w, b, axis="w", share=2, backend="cuda")
    with fp32_matmul(api, value):
        out = mixops.atm_fc(x, off, w, b, axis="w", share=2, backend="cuda")
    ref = R.atm_fc_lerp(*(t.double().cpu() for t in (x, off, w, b)), "w", 2)
    assert_close(out, ref, torch.float16, name="tf32 out")
    assert not torch.equal(out, ieee), "TF32 allowed, yet the result is the IEEE fp32 one"


# ActiveMLP-T stages (docs/atm.md section 11.1): H = W, C, share
STAGES = [(56, 64, 2), (28, 128, 4), (14, 320, 4), (7, 512, 8)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stage", STAGES, ids=[f"s{i + 1}" for i in range(4)])
def test_gpu_activemlp_stage_shapes(stage, dtype):
    hw, C, share = stage
    for axis in AXES:
        _gpu_check_sample((2, hw, hw, C), share, axis, "normal1", dtype)
        _gpu_check_fc((2, hw, hw, C), C, share, axis, "normal1", dtype)


@needs_cuda
def test_gpu_prime_batch():
    _gpu_check_sample((37, 7, 7, 512), 8, "h", "normal5", torch.bfloat16)
    _gpu_check_fc((37, 7, 7, 512), 512, 8, "w", "normal5", torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_is_deterministic(dtype):
    """Bit-identical gradients over two runs, at a size where many positions gather from the
    same source (unordered atomics would show)."""
    shape = (8, 28, 28, 64)
    x, off = strided_inputs(shape, 2, "w", "normal5", dtype, "cuda")
    w, b = _fc_params(64, 64, dtype, "cuda")
    g = torch.randn(shape, dtype=torch.float64).to("cuda", dtype)

    def grads():
        return [
            *_ops()._atm_sample_cuda_backward([g], [True, True], x, off, "w", 2),
            *_ops()._atm_fc_cuda_backward([g], [True] * 4, x, off, w, b, "w", 2),
        ]

    first, second = grads(), grads()
    for name, a, e in zip(("sample x", "sample offset", "fc x", "fc offset", "fc weight", "fc bias"), first, second):
        assert torch.equal(a, e), f"grad {name} differs between two runs"


@needs_cuda
def test_gpu_runs_on_the_inputs_device_not_the_current_one():
    """Inputs on cuda:1 while cuda:0 is current: the forward and every backward kernel (the
    gather backward, dW, db) launch under the inputs' device and its stream (the CUDAGuard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (inputs on cuda:1, cuda:0 current); this machine has {torch.cuda.device_count()}")
    shape, c_out, share, axis = AWKWARD, 9, 4, "h"
    with torch.cuda.device(0):
        x, off = strided_inputs(shape, share, axis, "normal5", torch.float32, "cuda:1")
        w, b = _fc_params(shape[-1], c_out, torch.float32, "cuda:1")
        g = torch.randn(*shape[:-1], c_out, dtype=torch.float64).to("cuda:1", torch.float32)
        leaves = [t.detach().requires_grad_() for t in (x, off, w, b)]
        out = mixops.atm_fc(*leaves, axis=axis, share=share, backend="cuda")
        got = torch.autograd.grad(out, leaves, g)
        assert torch.cuda.current_device() == 0
    want = _reference_fc(x, off, w, b, g, axis, share)
    for name, a, e in zip(("out", "x", "offset", "weight", "bias"), (out, *got), want):
        assert a.device == x.device, name
        assert_close(a, e, torch.float32, name=f"fc {name} on cuda:1")


@needs_cuda
def test_gpu_long_line_uses_opt_in_shared_memory():
    """A line whose fp32 gradient slab exceeds the default 48 KB (2000 positions x share 8)."""
    _gpu_check_sample((1, 2, 2000, 8), 8, "w", "normal5", torch.float32)


@needs_cuda
def test_gpu_matches_cpu_emulation():
    """The kernels and the CPU emulation of their math agree (fp32, normal offsets)."""
    x, off = strided_inputs(AWKWARD, 4, "h", "normal5", torch.float32)
    w, b = _fc_params(24, 9, torch.float32)
    g = torch.randn(*AWKWARD[:-1], 9)
    cpu = [_ops()._atm_sample_cuda(x, off, "h", 4), _ops()._atm_fc_cuda(x, off, w, b, "h", 4),
           *_ops()._atm_fc_cuda_backward([g], [True] * 4, x, off, w, b, "h", 4)]
    dev = [t.cuda() for t in (x, off, w, b, g)]
    gpu = [_ops()._atm_sample_cuda(*dev[:2], "h", 4), _ops()._atm_fc_cuda(*dev[:4], "h", 4),
           *_ops()._atm_fc_cuda_backward([dev[4]], [True] * 4, *dev[:4], "h", 4)]
    for name, a, e in zip(("sample", "fc", "gx", "goff", "gw", "gb"), gpu, cpu):
        assert_close(a, e.double(), torch.float32, name=name)


@needs_cuda
def test_gpu_small_case_for_compute_sanitizer():
    """One tiny call of every kernel (run this file under compute-sanitizer with -k sanitizer)."""
    _gpu_check_sample((1, 3, 4, 8), 2, "w", "edges", torch.float32)
    _gpu_check_fc((1, 3, 4, 8), 5, 2, "h", "normal5", torch.float16)


@needs_cuda
def test_gpu_float64_and_bad_devices():
    """fp64 runs (accumulating in fp64, for gradcheck-grade checks); mixed devices and integer
    tensors are refused before any launch."""
    _gpu_check_sample(AWKWARD, 4, "w", "normal5", torch.float64)
    _gpu_check_fc(AWKWARD, 13, 4, "h", "normal5", torch.float64)
    x, off = strided_inputs((1, 3, 4, 8), 2, "w", "normal1", torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="offset must be a CUDA tensor"):
        _ops()._atm_sample_cuda(x, off.cpu(), "w", 2)
    with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64"):
        _ops()._atm_sample_cuda(x.long(), off.long(), "w", 2)
