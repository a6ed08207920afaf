"""The Triton kernels of ``mixops.morph_fc`` (``mixops.kernels.morph_fc``), beyond the generic op
tests: canary buffers around every output, tiles smaller than the shapes (several programs,
several reduction steps, ragged edges), split-M weight gradients, ``needs`` handling, expanded
incoming gradients, determinism, and GPU accuracy tests (skipped without a GPU); the sm_90 builds are in
test_morph_fc_sm90.py."""
from __future__ import annotations

import math
import os

import pytest
import torch
from mixops.kernels import morph_fc as K
from mixops_testing import assert_close, cpu_and_cuda, fp32_matmul

import mixops
from mixops.reference import morph_fc as ref

f64 = torch.float64

# axis -> (x shape [B, T, H, W, C], segment_dim): F = 20 and M (180 / 72 rows) are not
# multiples of 16; spatial chunks wrap across rows / columns (L = 4 divides neither W = 10 nor
# H = 6), "hs" has 15 strided chunks per frame, "t" has F = T*C/G = 5*16/4 = 20
SHAPES = {
    "w": ((1, 3, 6, 10, 20), 4),
    "h": ((1, 3, 6, 10, 20), 4),
    "hs": ((1, 3, 6, 10, 20), 4),
    "t": ((3, 5, 2, 3, 16), 4),
}
SMALL_TILES = K.Blocks(m=16, n=16, k=16, num_warps=4, num_stages=1)


def _inputs(axis, dtype=f64, device="cpu"):
    shape, L = SHAPES[axis]
    F = K.geometry(shape, L, axis).F
    x = torch.randn(shape, dtype=f64)
    w = torch.randn(F, F, dtype=f64) / math.sqrt(F)
    b = torch.randn(F, dtype=f64)
    return [t.to(dtype=dtype, device=device) for t in (x, w, b)] + [L]


def _reference_grads(x, w, b, L, axis, g):
    leaves = [t.detach().to(f64).requires_grad_() for t in (x, w, b)]
    out = ref.morph_fc(*leaves, L, axis)
    return torch.autograd.grad(out, leaves, g.to(f64))


def _poisoned(shape, pad, dtype, device="cpu"):
    """A NaN buffer with ``pad`` extra entries on every side of every dimension, and the view
    of ``shape`` inside it (non-contiguous, non-zero offset)."""
    big = torch.full([n + 2 * pad for n in shape], float("nan"), dtype=dtype, device=device)
    inner = big[tuple(slice(pad, pad + n) for n in shape)]
    return big, inner


def _outside_is_nan(big, pad, shape):
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[tuple(slice(pad, pad + n) for n in shape)] = False
    return bool(big[mask].isnan().all())


@pytest.fixture(params=[False, True], ids=["heuristic_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    """Run under the block-size heuristics, and with 16-wide tiles that cut every test shape
    into several programs and reduction steps with ragged edges."""
    if request.param:
        monkeypatch.setattr(K, "gemm_blocks", lambda M, F, dtype: SMALL_TILES)
        monkeypatch.setattr(K, "grad_weight_blocks", lambda M, F, dtype: SMALL_TILES)
    return request.param


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("axis", list(SHAPES))
def test_forward_writes_exactly_its_output(axis, dtype, tiles):
    """The output slice of a NaN canary buffer is fully written, nothing around it is."""
    x, w, b, L = _inputs(axis, dtype)
    geo = K.geometry(tuple(x.shape), L, axis)
    big, out = _poisoned(x.shape, 1, dtype)
    K.launch_gemm(x, w, b, out, geo, transpose_weight=True)
    assert _outside_is_nan(big, 1, x.shape)
    assert_close(out, ref.morph_fc(x.to(f64), w.to(f64), b.to(f64), L, axis), dtype)


@pytest.mark.parametrize("axis", list(SHAPES))
def test_grad_input_writes_exactly_its_output(axis, tiles):
    """dX = scatter(dY_g @ W) into a canary buffer, from a dY strided like a channels-first view."""
    x, w, b, L = _inputs(axis)
    g = torch.randn(x.shape, dtype=f64)
    g_view = g.movedim(-1, 1).contiguous().movedim(1, -1)
    geo = K.geometry(tuple(x.shape), L, axis)
    big, dx = _poisoned(x.shape, 2, f64)
    K.launch_gemm(g_view, w, None, dx, geo, transpose_weight=False)
    assert _outside_is_nan(big, 2, x.shape)
    assert_close(dx, _reference_grads(x, w, b, L, axis, g)[0], name="grad x")


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("axis", list(SHAPES))
def test_grad_weight_partials(axis, split, tiles):
    """dW / db split partials in canary buffers: every partial written, nothing outside, and
    their sums are the reference gradients (split 3 leaves a ragged last row range)."""
    x, w, b, L = _inputs(axis)
    g = torch.randn(x.shape, dtype=f64)
    geo = K.geometry(tuple(x.shape), L, axis)
    big_w, dw = _poisoned((split, geo.F, geo.F), 1, f64)
    big_b, db = _poisoned((split, geo.F), 3, f64)
    K.launch_grad_weight(g, x, geo, dw, db)
    assert _outside_is_nan(big_w, 1, dw.shape) and _outside_is_nan(big_b, 3, db.shape)
    _, want_w, want_b = _reference_grads(x, w, b, L, axis, g)
    assert_close(dw.sum(0), want_w, name="grad weight")
    assert_close(db.sum(0), want_b, name="grad bias")


@pytest.mark.parametrize("axis", list(SHAPES))
def test_grad_bias_alone(axis):
    """With dW not needed the kernel runs one program per output tile column and writes db."""
    x, w, b, L = _inputs(axis)
    g = torch.randn(x.shape, dtype=f64)
    geo = K.geometry(tuple(x.shape), L, axis)
    big, db = _poisoned((2, geo.F), 1, f64)
    K.launch_grad_weight(g, x, geo, None, db)
    assert _outside_is_nan(big, 1, db.shape)
    assert_close(db.sum(0), _reference_grads(x, w, b, L, axis, g)[2], name="grad bias")


@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
@pytest.mark.parametrize("axis", ["h", "t"])
def test_backward_returns_only_what_is_needed(axis, needs):
    x, w, b, L = _inputs(axis)
    g = torch.randn(x.shape, dtype=f64)
    got = K.backward([g], list(needs), x, w, b, L, axis)
    want = [t for t, n in zip(_reference_grads(x, w, b, L, axis, g), needs) if n]
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert_close(a, e)


@pytest.mark.parametrize("axis", list(SHAPES))
def test_backward_takes_an_expanded_gradient(axis):
    """A zero-stride incoming gradient (what opcheck and `out.sum()` produce) is read in place."""
    x, w, b, L = _inputs(axis)
    g = torch.randn(x.shape[-1], dtype=f64).expand(x.shape)
    got = K.backward([g], [True, True, True], x, w, b, L, axis)
    for a, e, n in zip(got, _reference_grads(x, w, b, L, axis, g), ("x", "weight", "bias")):
        assert_close(a, e, name=f"grad {n}")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("axis", ["w", "t"])
def test_backward_is_bit_identical_across_runs(axis, device, monkeypatch):
    """Fixed split partials + an ordered sum: no run-to-run difference (3 splits forced here)."""
    monkeypatch.setattr(K, "grad_weight_split", lambda M, F, dtype: 3)
    x, w, b, L = _inputs(axis, torch.float32, device)
    g = torch.randn(x.shape, device=device)
    first = K.backward([g], [True, True, True], x, w, b, L, axis)
    second = K.backward([g], [True, True, True], x, w, b, L, axis)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_image_input_keeps_its_rank():
    x = torch.randn(2, 6, 10, 12, dtype=f64)
    w = torch.randn(12, 12, dtype=f64)
    out = K.forward(x, w, None, 4, "h")
    assert out.shape == x.shape and out.is_contiguous()
    assert_close(out, ref.morph_fc(x, w, None, 4, "h"))
    g = torch.randn_like(x)
    (dx,) = K.backward([g], [True, False, False], x, w, None, 4, "h")
    assert_close(dx, _reference_grads(x, w, torch.zeros(12, dtype=f64), 4, "h", g)[0])


def test_empty_batch():
    x = torch.randn(0, 2, 6, 10, 12, dtype=f64)
    w = torch.randn(12, 12, dtype=f64)
    b = torch.randn(12, dtype=f64)
    assert K.forward(x, w, b, 4, "w").shape == x.shape
    dx, dw, db = K.backward([torch.zeros_like(x)], [True, True, True], x, w, b, 4, "w")
    assert dx.shape == x.shape and not dw.any() and not db.any()


@pytest.mark.parametrize("axis", ["w", "t"])
def test_column_major_weight(axis):
    """A weight stored transposed (W.t().contiguous().t()) puts the unit stride on the other
    dimension of the weight operand's tile (weight_operand): forward and all gradients still
    match the reference."""
    x, w, b, L = _inputs(axis)
    w_cm = w.t().contiguous().t()
    assert w_cm.stride(0) == 1 and torch.equal(w_cm, w)
    F = w.shape[0]
    assert K.weight_operand(w_cm, True, F)[3] == 1 and K.weight_operand(w, True, F)[3] == 0
    g = torch.randn(x.shape, dtype=f64)
    assert_close(K.forward(x, w_cm, b, L, axis), ref.morph_fc(x, w, b, L, axis))
    got = K.backward([g], [True, True, True], x, w_cm, b, L, axis)
    for a, e, n in zip(got, _reference_grads(x, w, b, L, axis, g), ("x", "weight", "bias")):
        assert_close(a, e, name=f"grad {n}")


# (axis, x shape, segment_dim) -> dW split of (fp32, bf16, fp16, fp64): MorphMLP-S stages at
# B = 128 (token maps and the channel FC have the same GEMM) and the temporal FC at B = T = 8
OFFICIAL_SPLITS = [
    ("w", (128, 1, 56, 56, 112), 14, (32, 256, 256, 16)),
    ("c", (128, 1, 28, 28, 224), 1, (9, 64, 64, 5)),
    ("h", (128, 1, 14, 14, 392), 28, (2, 16, 16, 1)),
    ("hs", (128, 1, 7, 7, 784), 49, (1, 5, 5, 1)),
    ("t", (8, 8, 14, 14, 392), 8, (2, 16, 16, 1)),
]


@pytest.mark.parametrize("axis, shape, L, splits", OFFICIAL_SPLITS, ids=[f"{c[0]}-{c[1][-1]}" for c in OFFICIAL_SPLITS])
def test_grad_weight_split_depends_on_the_shape_alone(axis, shape, L, splits, monkeypatch):
    """The dW split (hence dW's bits) at the official shapes is a fixed function of (M, F,
    dtype): the same numbers whatever GPU runs it, and no device is ever queried."""

    def no_device_query(*args, **kwargs):
        raise AssertionError("grad_weight_split consulted torch.cuda")

    monkeypatch.delenv("TRITON_INTERPRET")  # the GPU rule, not the interpreter's single range
    for name in ("get_device_properties", "device_count", "current_device", "get_device_capability"):
        monkeypatch.setattr(torch.cuda, name, no_device_query)
    geo = K.geometry(shape, L, axis)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, f64)
    assert tuple(K.grad_weight_split(geo.M, geo.F, d) for d in dtypes) == splits


def test_interpreter_heuristics_keep_test_launches_small():
    """Under TRITON_INTERPRET=1 the largest family test shapes need a handful of programs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter heuristics only")
    largest = [((1, 16, 2, 14, 392), 28, "w"), ((1, 16, 1, 2, 392), 14, "t"), ((1, 1, 7, 7, 588), 49, "hs")]
    for shape, L, axis in largest:
        geo = K.geometry(shape, L, axis)
        b = K.gemm_blocks(geo.M, geo.F, torch.float32)
        assert math.ceil(geo.M / b.m) * math.ceil(geo.F / b.n) <= 16
        g = K.grad_weight_blocks(geo.M, geo.F, torch.float32)
        assert math.ceil(geo.F / g.m) * math.ceil(geo.F / g.n) <= 16


# ---------------------------------------------------------------------------------------------
# GPU: accuracy against the float64 reference at MorphMLP shapes (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

# (x shape, segment_dim, axis): MorphMLP-S stages (docs/morph_fc.md sections 10.1 / 10.2), B = 2, plus a wrap-around
GPU_CASES = [
    ((2, 1, 56, 56, 112), 14, "w"),
    ((2, 1, 56, 56, 112), 14, "h"),
    ((2, 1, 28, 28, 224), 28, "h"),
    ((2, 1, 14, 14, 392), 28, "w"),
    ((2, 1, 14, 14, 392), 28, "h"),
    ((2, 1, 7, 7, 784), 49, "hs"),
    ((2, 2, 14, 14, 392), 7, "hs"),
    ((2, 3, 9, 10, 48), 6, "w"),
    ((2, 8, 14, 14, 392), 8, "t"),
    ((1, 16, 14, 14, 392), 14, "t"),
]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[2]}-{'x'.join(map(str, c[0]))}")
def test_gpu_forward_and_backward_match_float64(case, dtype):
    shape, L, axis = case
    F = K.geometry(shape, L, axis).F
    x = torch.randn(shape, dtype=f64)
    w = torch.randn(F, F, dtype=f64) / math.sqrt(F)
    b = torch.randn(F, dtype=f64)
    g = torch.randn(shape, dtype=f64)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (x, w, b)]
    out = mixops.morph_fc(*leaves, segment_dim=L, axis=axis, backend="triton")
    got = torch.autograd.grad(out, leaves, g.to("cuda", dtype))
    expect = ref.morph_fc(x, w, b, L, axis)
    want = _reference_grads(x, w, b, L, axis, g)
    assert_close(out, expect, dtype)
    for a, e, n in zip(got, want, ("x", "weight", "bias")):
        assert_close(a, e, dtype, name=f"grad {n}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("axis", ["w", "h", "hs", "t"])
def test_gpu_channels_last_view_and_tf32(axis):
    """x as the channels-last view of a [B, C, T, H, W] tensor; with TF32 allowed the error is
    TF32-sized, not garbage."""
    shape, L = ((2, 8, 14, 14, 392), 8) if axis == "t" else ((2, 2, 14, 14, 392), 28)
    F = K.geometry(shape, L, axis).F
    B, T, H, W, C = shape
    x = torch.randn(B, C, T, H, W, dtype=f64).permute(0, 2, 3, 4, 1)
    w = torch.randn(F, F, dtype=f64) / math.sqrt(F)
    b = torch.randn(F, dtype=f64)
    expect = ref.morph_fc(x, w, b, L, axis)
    out = K.forward(x.to("cuda", torch.float32), w.float().cuda(), b.float().cuda(), L, axis)
    assert_close(out, expect, torch.float32)
    with fp32_matmul():
        out = K.forward(x.to("cuda", torch.float32), w.float().cuda(), b.float().cuda(), L, axis)
    assert_close(out, expect, torch.bfloat16)


@pytest.mark.needs_cuda
@pytest.mark.slow
def test_gpu_int64_offsets():
    """More than 2**31 elements: the last batch item matches the reference on that item."""
    shape, L = (7000, 8, 14, 14, 196), 14  # 2.15e9 elements, bf16 4.3 GB
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    assert x.numel() > 2**31
    w = (torch.randn(196, 196, device="cuda") / 14).bfloat16()
    b = torch.randn(196, device="cuda").bfloat16()
    out = K.forward(x, w, b, L, "hs")
    tail = out[-1:].to(f64).cpu()
    del out
    assert_close(tail, ref.morph_fc(x[-1:].to(f64).cpu(), w.to(f64).cpu(), b.to(f64).cpu(), L, "hs"), torch.bfloat16)


# MorphMLP-T image stages 1-4 (docs/morph_fc.md section 10.1): C and L as in the config, one small frame whose H*W
# L divides (chunks of 2 rows / columns at stages 2-3), B = 2, so every official D (6, 6, 12, 12)
# and F (84, 168, 336, 588) runs through forward and backward
OFFICIAL_T = [
    ("w", (2, 2, 7, 84), 14), ("h", (2, 4, 7, 168), 28),
    ("w", (2, 7, 4, 336), 28), ("hs", (2, 7, 7, 588), 49),
]  # fmt: skip


@pytest.mark.parametrize("axis, shape, L", OFFICIAL_T, ids=[f"{a}-C{s[-1]}" for a, s, _ in OFFICIAL_T])
def test_official_channel_counts(axis, shape, L):
    """C not a power of two with its official L: forward and all gradients vs float64."""
    x = torch.randn(shape, dtype=f64).float()
    C = shape[-1]
    w = (torch.randn(C, C, dtype=f64) / math.sqrt(C)).float()
    b = torch.randn(C, dtype=f64).float()
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = mixops.morph_fc(*leaves, segment_dim=L, axis=axis, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want_out = ref.morph_fc(x.double(), w.double(), b.double(), L, axis)
    assert_close(out, want_out, torch.float32, name="y")
    for name, a, e in zip(("x", "weight", "bias"), got, _reference_grads(x, w, b, L, axis, g)):
        assert_close(a, e, torch.float32, name=name)
