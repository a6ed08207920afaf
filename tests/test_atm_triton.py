"""The Triton ATM gather and the fused gather-GEMM ``atm_fc`` (``kernels/atm.py``,
``mixops.kernels.atm``) beyond the generic op tests:
outputs written exactly where they belong (NaN-filled canary buffers around strided views),
awkward sizes, every offset distribution, non-power-of-2 ``share``, huge offsets, positions in
fp32 for half storage, gradients against torchvision at the kinks, the ``needs`` subsets,
bit-identical backward, the fused FC's awkward C / C_out and multi-block tiles, the block-size
heuristics, an sm_90 compile of every kernel, and
``needs_cuda`` GPU tests (dtypes, model shapes, determinism, > 2**31 elements).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import mixops  # noqa: E402
from mixops.kernels import atm as K  # noqa: E402
from mixops.kernels._common import Blocks, dot_dtypes  # noqa: E402
from mixops.reference import atm as R  # noqa: E402
import sm90_compile  # noqa: E402
from mixops_testing import assert_close, skip_unless_runs  # noqa: E402
from test_atm_cases import KINDS, official_atm_op, strided_inputs  # noqa: E402

AXES = ("h", "w")
# every share once, alternating the compute dtype (fp64 / fp32): interpreted programs are slow
SHARE_DTYPES = [(1, torch.float64), (2, torch.float32), (3, torch.float64), (4, torch.float32), (8, torch.float32)]
AWKWARD = (3, 5, 11, 24)  # B, H, W, C: nothing a multiple of a block; C divisible by every share
NAN = float("nan")


@pytest.fixture
def interpreted():
    """For the tests that run the kernels on CPU tensors (under the interpreter)."""
    skip_unless_runs("atm_sample", "triton", "cpu")


on_cpu = pytest.mark.usefixtures("interpreted")


def _canary(shape, dtype, device="cpu"):
    """A non-contiguous view of ``shape`` inside a NaN-filled buffer, and the buffer's mask of
    the view: whatever a kernel writes outside the view shows as a lost NaN."""
    B, H, W, C = shape
    buf = torch.full((B + 1, H + 2, W + 3, C + 5), NAN, dtype=dtype, device=device)
    inside = torch.zeros(buf.shape, dtype=torch.bool, device=device)
    index = (slice(1, None), slice(1, H + 1), slice(2, W + 2), slice(3, C + 3))
    inside[index] = True
    return buf, buf[index], inside


def _untouched(buf, inside, name):
    assert buf[~inside].isnan().all(), f"{name}: the kernel wrote outside its output"


def _reference_grads(x, off, g, axis, share):
    """Float64 gradients of the reference, from the same (rounded) values the kernel sees."""
    xr = x.detach().double().cpu().contiguous().requires_grad_()
    orr = off.detach().double().cpu().contiguous().requires_grad_()
    out = R.atm_sample_lerp(xr, orr, axis, share)
    gx, go = torch.autograd.grad(out, (xr, orr), g.double().cpu())
    return out.detach(), gx, go


def _exact(kind):
    """Offsets whose positions are exact integers give bit-exact values in any dtype."""
    return kind in ("integer", "edges")


# --- forward and backward into canary buffers, every distribution and share -------------------


@on_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share, dtype", SHARE_DTYPES)
@pytest.mark.parametrize("axis", AXES)
def test_forward_writes_exactly_its_output(axis, share, dtype, kind):
    x, off = strided_inputs(AWKWARD, share, axis, kind, dtype)
    buf, out, inside = _canary(AWKWARD, dtype)
    K.launch_forward(x, off, out, axis, share)
    _untouched(buf, inside, "out")
    ref = R.atm_sample_lerp(x.double(), off.double(), axis, share)
    if _exact(kind):
        assert torch.equal(out.double(), ref)
    else:
        assert_close(out, ref, dtype, name="out")


@on_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share, dtype", SHARE_DTYPES)
@pytest.mark.parametrize("axis", AXES)
def test_backward_writes_exactly_its_gradients(axis, share, dtype, kind):
    B, H, W, C = AWKWARD
    x, off = strided_inputs(AWKWARD, share, axis, kind, dtype)
    # an expanded (zero-stride) incoming gradient, as autograd hands out for a sum()
    g = torch.randn(B, 1, W, C, dtype=torch.float64).to(dtype).expand(B, H, W, C)
    buf_x, gx, in_x = _canary(AWKWARD, dtype)
    buf_o, go, in_o = _canary(off.shape, dtype)
    K.launch_backward(g, x, off, gx, go, axis, share)
    _untouched(buf_x, in_x, "grad x")
    _untouched(buf_o, in_o, "grad offset")
    _, want_x, want_o = _reference_grads(x, off, g, axis, share)
    assert_close(gx, want_x, dtype, name="grad x")
    assert_close(go, want_o, dtype, name="grad offset")


@on_cpu
@pytest.mark.parametrize("axis", AXES)
def test_backward_computes_only_what_is_needed(axis):
    """``needs`` = (x only) and (offset only) give the same bits as both, and leave the other
    gradient's pointer alone."""
    share = 4
    x, off = strided_inputs(AWKWARD, share, axis, "normal5")
    g = torch.randn(AWKWARD, dtype=torch.float64)
    both = K.backward([g], [True, True], x, off, axis, share)
    only_x = K.backward([g], [True, False], x, off, axis, share)
    only_o = K.backward([g], [False, True], x, off, axis, share)
    assert len(only_x) == len(only_o) == 1
    assert torch.equal(only_x[0], both[0]) and torch.equal(only_o[0], both[1])
    buf, go, inside = _canary(off.shape, torch.float64)
    K.launch_backward(g, x, off, None, go, axis, share)
    assert torch.equal(go, both[1])
    buf, gx, inside = _canary(AWKWARD, torch.float64)
    K.launch_backward(g, x, off, gx, None, axis, share)
    assert torch.equal(gx, both[0])


@on_cpu
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 9, 2), (2, 7, 1, 8), (1, 3, 2, 40)])
@pytest.mark.parametrize("axis", AXES)
def test_degenerate_lines(shape, axis):
    """Lines of length 1 (every neighbour out of range), single channels, C above a block."""
    share = 2 if shape[-1] % 2 == 0 else 1
    x, off = strided_inputs(shape, share, axis, "normal1")
    g = torch.randn(shape, dtype=torch.float64)
    out = K.forward(x, off, axis, share)
    gx, go = K.backward([g], [True, True], x, off, axis, share)
    ref, want_x, want_o = _reference_grads(x, off, g, axis, share)
    assert_close(out, ref, name="out")
    assert_close(gx, want_x, name="grad x")
    assert_close(go, want_o, name="grad offset")


# --- conventions at the edges ------------------------------------------------------------------


@on_cpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("axis", AXES)
def test_huge_offsets_give_exact_zeros(axis, dtype):
    """Offsets far outside the line (up to the dtype's max) sample zeros and have zero
    gradients; the position clamp keeps the float -> int conversion defined."""
    shape = (2, 4, 6, 8)
    x, off = strided_inputs(shape, 2, axis, "normal1", dtype)
    big = torch.finfo(dtype).max
    values = [big, -big, 1e4, -1e4] + ([2.0**24 + 1, -(2.0**24) - 1] if dtype != torch.float16 else [])
    values = torch.tensor(values, dtype=torch.float64).to(dtype)
    pick = torch.randint(0, 2, off.shape, dtype=torch.bool)
    off = torch.where(pick, values[torch.randint(0, len(values), off.shape)], off)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    out = K.forward(x, off, axis, 2)
    gx, go = K.backward([g], [True, True], x, off, axis, 2)
    far = pick.repeat_interleave(2, dim=-1)
    assert (out[far] == 0).all() and (go[pick] == 0).all()
    ref, want_x, want_o = _reference_grads(x, off, g, axis, 2)
    assert_close(out, ref, dtype, name="out")
    assert_close(gx, want_x, dtype, name="grad x")
    assert_close(go, want_o, dtype, name="grad offset")


@on_cpu
@pytest.mark.parametrize("axis", AXES)
def test_half_storage_keeps_fp32_positions(axis):
    """fp16 resolves only 1/32 px at p ~ 32-64 (docs/atm.md section 4.1): on a 61-long line, positions must be
    formed in fp32 from the fp16 offset to meet the fp16 tolerance."""
    shape = (1, 61, 61, 4) if axis == "h" else (1, 2, 61, 4)
    n = 61
    x = torch.randn(shape, dtype=torch.float64).half()
    off = (torch.rand(shape, dtype=torch.float64) * 0.9 + 0.05).half()  # fractional, p ~ j
    out = K.forward(x, off, axis, 1)
    ref = R.atm_sample_lerp(x.double(), off.double(), axis, 1)
    assert_close(out, ref, torch.float16, name="fp16 out")
    # the check has teeth: positions rounded to fp16 miss the tolerance
    view = [1, 1, 1, 1]
    view[1 if axis == "h" else 2] = n
    pos16 = (torch.arange(n, dtype=torch.float16).view(view) + off).double()
    coarse = R.atm_sample_lerp(x.double(), pos16 - torch.arange(n, dtype=torch.float64).view(view), axis, 1)
    with pytest.raises(AssertionError):
        assert_close(coarse, ref, torch.float16)


@on_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("share", [1, 4])
@pytest.mark.parametrize("axis", AXES)
def test_gradients_match_torchvision(axis, share, kind):
    """At the kinks (integers, p = -1, p = n) the gradients follow torchvision's deform_conv2d
    as ActiveMLP calls it: right-hand slope, x[0] at p = -1, nothing from outside."""
    pytest.importorskip("torchvision")
    B, H, W, C = 2, 4, 6, 8
    x, off = strided_inputs((B, H, W, C), share, axis, kind)
    g = torch.randn(B, H, W, C, dtype=torch.float64)
    xt = x.detach().clone().requires_grad_()
    ot = off.detach().clone().requires_grad_()
    eye = torch.eye(C, dtype=torch.float64)[:, :, None, None]
    tv = official_atm_op(
        xt.permute(0, 3, 1, 2), ot.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2), eye, None, axis
    ).permute(0, 2, 3, 1)
    want = torch.autograd.grad(tv, (xt, ot), g)
    out = K.forward(x, off, axis, share)
    got = K.backward([g], [True, True], x, off, axis, share)
    if _exact(kind):
        assert torch.equal(out, tv.detach())
    else:
        assert_close(out, tv, name="out")
    assert_close(got[0], want[0], name="grad x")
    assert_close(got[1], want[1], name="grad offset")


@on_cpu
def test_backward_is_bit_identical_with_colliding_samples():
    """Integer offsets in [-3, 3] pile many samples onto the same targets."""
    shape = (2, 9, 13, 16)
    for axis in AXES:
        x = torch.randn(shape)
        off = torch.randint(-3, 4, (*shape[:-1], 8)).float() + 0.5 * torch.rand(*shape[:-1], 8).round()
        g = torch.randn(shape)
        runs = [K.backward([g], [True, True], x, off, axis, 2) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*runs))


# --- the backward's per-target-block walk ------------------------------------------------------


@triton.jit
def _target_block_shifts_kernel(k_ptr, lo_ptr, hi_ptr, N, LANES: tl.constexpr, BLOCK_Q: tl.constexpr,
                                TARGET_BLOCKS: tl.constexpr):
    """The shift ranges that pass 1 of the backward records, for floor positions k [N, LANES]
    (int32, contiguous): lo, hi [TARGET_BLOCKS]."""
    lo = tl.full([TARGET_BLOCKS], N, tl.int32)
    hi = tl.full([TARGET_BLOCKS], -N, tl.int32)
    lanes = tl.arange(0, LANES)
    for q0 in range(0, N, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        ok = (q < N)[:, None] & (lanes < LANES)[None, :]
        k = tl.load(k_ptr + q[:, None] * LANES + lanes[None, :], mask=ok, other=0)
        lo, hi = K.target_block_shifts(lo, hi, k, q[:, None], ok, N, BLOCK_Q, TARGET_BLOCKS)
    blocks = tl.arange(0, TARGET_BLOCKS)
    tl.store(lo_ptr + blocks, lo)
    tl.store(hi_ptr + blocks, hi)


def _shift_ranges(k, block_q):
    """(lo, hi) per target block, written from the definition: every (source q, in-range target
    t in {k, k+1}) pair widens the range of t's block by the shift q - t, and the range of the
    other target's block too (target_block_shifts' one-shift slack)."""
    n = k.shape[0]
    blocks = math.ceil(n / block_q)
    lo, hi = [n] * blocks, [-n] * blocks
    for q in range(n):
        for kk in k[q].tolist():
            targets = [t for t in (kk, kk + 1) if 0 <= t < n]
            for t in targets:
                for j in {u // block_q for u in targets}:
                    lo[j], hi[j] = min(lo[j], q - t), max(hi[j], q - t)
    return lo, hi


@on_cpu
def test_target_block_shifts_bound_each_block_by_the_samples_that_reach_it():
    """One sample far inside the line widens only the ranges of its targets' block; samples off
    the line (huge offsets) widen nothing; a block no sample reaches has an empty range."""
    n, lanes, block_q = 45, 4, 8
    q = torch.arange(n)[:, None]
    k = q + torch.randint(-2, 2, (n, lanes))  # |shift| <= 3 everywhere ...
    k[3, 1] = 40  # ... but one sample from block 0 into block 5
    k[20, 2] = 2**30  # and two far off the line, which reach no target
    k[21, 0] = -(2**30)
    k = torch.where((k >= 23) & (k < 32), n + 5, k)  # nothing reaches block 3 (targets 24..31)
    target_blocks = triton.next_power_of_2(math.ceil(n / block_q))
    lo = torch.empty(target_blocks, dtype=torch.int32)
    hi = torch.empty(target_blocks, dtype=torch.int32)
    _target_block_shifts_kernel[(1,)](k.to(torch.int32).contiguous(), lo, hi, n, LANES=lanes, BLOCK_Q=block_q,
                                      TARGET_BLOCKS=target_blocks)
    want_lo, want_hi = _shift_ranges(k, block_q)
    blocks = math.ceil(n / block_q)
    assert lo[:blocks].tolist() == want_lo and hi[:blocks].tolist() == want_hi
    assert lo[5] <= 3 - 41 and lo[3] > hi[3]  # the far sample's block; the unreached block
    for j in (0, 1, 2, 4):
        assert -4 <= lo[j] <= hi[j] <= 4, (j, lo[j], hi[j])


@on_cpu
@pytest.mark.parametrize("axis", AXES)
def test_backward_with_short_target_blocks_and_far_offsets(monkeypatch, axis):
    """Target blocks of 4 positions (the GPU walks blocks, the interpreter whole lines), small
    offsets plus far in-range ones and ones far off the line: the reference gradients, and the
    same bits as the whole-line walk (each target still sums its samples in shift order)."""
    shape, share = (2, 29, 23, 8), 2
    x, off = strided_inputs(shape, share, axis, "normal1", torch.float64)
    n = shape[1 if axis == "h" else 2]
    off = off * 0.5
    off[0, 3, 2, 1] = n - 4.5  # far, but inside the line
    off[1, 5, 7, 0] = -(n - 3.25)
    off[0, 8, 8, 2] = 1e30  # off the line: reaches no target
    off[1, 1, 1, 3] = -float("inf")
    g = torch.randn(shape, dtype=torch.float64)
    whole = K.backward([g], [True, True], x, off, axis, share)
    real = K.backward_blocks
    monkeypatch.setattr(K, "backward_blocks", lambda n, c, s: dataclasses.replace(
        real(n, c, s), q=4, target_blocks=triton.next_power_of_2(math.ceil(n / 4))))
    short = K.backward([g], [True, True], x, off, axis, share)
    _, want_x, want_o = _reference_grads(x, off, g, axis, share)
    assert_close(short[0], want_x, name="grad x")
    assert_close(short[1], want_o, name="grad offset")
    assert torch.equal(short[0], whole[0]) and torch.equal(short[1], whole[1])


# --- atm_fc: the gather fused into the FC GEMM ----------------------------------------------

# C_out values that are no multiple of any block: below one 16-column block, across two, and
# above one 256-column interpreter block
FC_OUTS = (7, 19, 300)


def _fc_params(c_out, c, dtype, device="cpu"):
    """weight as a transposed view (strides (1, C_out)) and bias as a strided slice."""
    w = torch.randn(c, c_out, dtype=torch.float64).to(dtype).t()
    b = torch.randn(2 * c_out, dtype=torch.float64).to(dtype)[::2]
    return w.to(device), b.to(device)


def _fc_reference(x, off, w, b, g, axis, share):
    """Float64 output and gradients (x, offset, weight, bias) of the lerp + FC reference."""
    leaves = [t.detach().double().cpu().contiguous().requires_grad_() for t in (x, off, w, b)]
    out = R.atm_fc_lerp(*leaves, axis, share)
    grads = torch.autograd.grad(out, leaves, g.double().cpu())
    return out.detach(), grads


@on_cpu
@pytest.mark.parametrize("c_out", FC_OUTS)
@pytest.mark.parametrize("share, dtype", [(1, torch.float64), (2, torch.float32), (4, torch.float16), (8, torch.float32)])
@pytest.mark.parametrize("axis", AXES)
def test_fc_forward_writes_exactly_its_output(axis, share, dtype, c_out):
    B, H, W, C = AWKWARD
    x, off = strided_inputs(AWKWARD, share, axis, "normal5", dtype)
    w, b = _fc_params(c_out, C, dtype)
    for bias in (b, None):
        buf, out, inside = _canary((B, H, W, c_out), dtype)
        K.launch_fc_forward(x, off, w, bias, out, axis, share)
        _untouched(buf, inside, "out")
        ref = R.atm_fc_lerp(x.double(), off.double(), w.double(), None if bias is None else b.double(), axis, share)
        assert_close(out, ref, dtype, name="out")


@on_cpu
@pytest.mark.parametrize("axis", AXES)
def test_fc_small_tiles_loop_over_channels(monkeypatch, axis):
    """16 x 16 x 16 tiles: several row, column and reduction blocks, all with ragged edges
    (165 pixels, C = 24, C_out = 19), and the reduction loop carries the accumulator."""
    monkeypatch.setattr(K, "fc_blocks", lambda *a, **k: Blocks(m=16, n=16, k=16, num_warps=4, num_stages=1))
    B, H, W, C = AWKWARD
    for share in (1, 2, 4, 8):
        x, off = strided_inputs(AWKWARD, share, axis, "edges")
        w, b = _fc_params(19, C, torch.float64)
        buf, out, inside = _canary((B, H, W, 19), torch.float64)
        K.launch_fc_forward(x, off, w, b, out, axis, share)
        _untouched(buf, inside, "out")
        assert_close(out, R.atm_fc_lerp(x, off, w, b, axis, share), name=f"out share {share}")


@on_cpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", AXES)
def test_fc_matches_torchvision(axis, kind):
    """The fused kernel against deform_conv2d as the official ATMOp drives it, at the kinks."""
    pytest.importorskip("torchvision")
    share, c_out = 4, 19
    x, off = strided_inputs(AWKWARD, share, axis, kind)
    w, b = _fc_params(c_out, AWKWARD[-1], torch.float64)
    assert_close(K.fc_forward(x, off, w, b, axis, share), R.atm_fc_deform(x, off, w, b, axis, share))


@on_cpu
@pytest.mark.parametrize("share, dtype", [(1, torch.float64), (2, torch.float32), (4, torch.float64), (8, torch.float32)])
@pytest.mark.parametrize("axis", AXES)
def test_fc_backward(axis, share, dtype):
    """All four gradients against the float64 reference from an expanded incoming gradient;
    every ``needs`` subset gives the same bits as all four; two runs are bit-identical."""
    B, H, W, C = AWKWARD
    c_out = 19
    x, off = strided_inputs(AWKWARD, share, axis, "normal1", dtype)
    w, b = _fc_params(c_out, C, dtype)
    g = torch.randn(B, 1, W, c_out, dtype=torch.float64).to(dtype).expand(B, H, W, c_out)
    every = K.fc_backward([g], [True] * 4, x, off, w, b, axis, share)
    _, want = _fc_reference(x, off, w, b, g, axis, share)
    for got, ref, name in zip(every, want, ("x", "offset", "weight", "bias")):
        assert got.dtype == dtype
        assert_close(got, ref, dtype, name=f"grad {name}")
    for i in range(4):
        needs = [j == i for j in range(4)]
        (only,) = K.fc_backward([g], needs, x, off, w, b, axis, share)
        assert torch.equal(only, every[i])
    again = K.fc_backward([g], [True] * 4, x, off, w, b, axis, share)
    assert all(torch.equal(a1, a2) for a1, a2 in zip(every, again))


# --- block-size heuristics ---------------------------------------------------------------------


def _is_pow2(v):
    return v >= 1 and v & (v - 1) == 0


def set_interpreting(monkeypatch, interpreting: bool):
    """Make _common.interpreting() (read at every call) answer ``interpreting``."""
    if interpreting:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("interpreting", [True, False])
def test_block_heuristics(monkeypatch, interpreting):
    set_interpreting(monkeypatch, interpreting)
    for n in (1, 3, 7, 14, 28, 56, 61, 128, 256):
        for C, share in ((1, 1), (8, 8), (24, 3), (64, 2), (128, 4), (320, 4), (512, 8), (64, 64)):
            cfg = K.backward_blocks(n, C, share)
            assert all(_is_pow2(v) for v in (cfg.share_p, cfg.q, cfg.g, cfg.target_blocks))
            assert cfg.share_p >= share and cfg.q <= triton.next_power_of_2(n)
            assert cfg.g <= triton.next_power_of_2(C // share)
            assert cfg.target_blocks >= math.ceil(n / cfg.q) > cfg.target_blocks // 2
            lanes = cfg.g * cfg.share_p
            if interpreting:
                assert cfg.q == triton.next_power_of_2(n)  # whole lines in one step
            elif lanes * cfg.q > 1024:
                # past the register budget only when one share group alone exceeds it
                assert cfg.g == 1 and cfg.q == 1
        for M in (1, 70, 10_000, 401_408):
            for C in (1, 3, 16, 64, 512):
                cfg = K.forward_blocks(M, C)
                assert _is_pow2(cfg.m) and _is_pow2(cfg.c) and cfg.c <= 128
                for c_out in (1, 7, 64, 300, 768):
                    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                        cfg = K.fc_blocks(M, C, c_out, dtype)
                        # tl.dot needs every tile dimension >= 16
                        assert all(_is_pow2(t) and t >= 16 for t in (cfg.m, cfg.n, cfg.k))
                        assert cfg.m * max(cfg.n, cfg.k) <= 65536
                        if not interpreting and dtype in (torch.float16, torch.bfloat16) and c_out <= 512:
                            assert cfg.n >= c_out  # one column block: each A tile gathered once
                        if not interpreting and dtype == torch.float32 and c_out <= 512:
                            assert cfg.n * 2 >= c_out  # at most two gathers per A tile
    # C = 320 (ActiveMLP-T stage 3): channel tiles that divide it, not a 128-lane third tile
    assert 320 % K.forward_blocks(128 * 196, 320).c == 0


def test_interpreter_grids_stay_small(monkeypatch):
    """The shapes of the ATM op tests launch at most ~200 interpreted programs per kernel."""
    set_interpreting(monkeypatch, True)
    for B, H, W, C in [(2, 5, 7, 16), (2, 4, 6, 8), (2, 4, 5, 8), (2, 6, 6, 8), (1, 3, 4, 4), AWKWARD]:
        for share in (1, 2, 4, 8):
            if C % share:
                continue
            for L, n in ((H, W), (W, H)):
                f = K.forward_blocks(B * H * W, C)
                b = K.backward_blocks(n, C, share)
                fwd = math.ceil(B * H * W / f.m) * math.ceil(C / f.c)
                bwd = B * L * math.ceil(C // share / b.g)
                assert fwd <= 200 and bwd <= 200, (B, H, W, C, share, fwd, bwd)
                for c_out in (*FC_OUTS, 8):
                    fc = K.fc_blocks(B * H * W, C, c_out, torch.float32)
                    steps = math.ceil(B * H * W / fc.m) * math.ceil(c_out / fc.n) * math.ceil(C / fc.k)
                    assert steps <= 20, (B, H, W, C, c_out, steps)


# --- the kernels compile for sm_90 with the GPU block sizes ------------------------------------
#
# triton.compile misbuilds runtime-bound loops in a process that started with TRITON_INTERPRET=1
# (the loop variable comes out as a raw IR value; triton 3.8), so the builds run in a child
# process without it, where the heuristics also pick their GPU block sizes.

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
# channel / group strides (1 for contiguous tensors, which triton specialises to the constant)
_UNIT_STRIDES = ("sx_c", "so_g", "sy_c", "sg_c", "sgx_c", "sgo_g", "sw_k")
# ActiveMLP-T/S/B stages (n = H = W, C, share)
_STAGES = [(56, 64, 2), (28, 128, 4), (14, 320, 4), (7, 512, 8)]
# id -> (kernel, dtype, stage, (need gX, need gOff), unit channel strides): every dtype at
# stage 1, the other stages in bf16, the one-gradient variants, a strided build
_BUILDS = {
    **{f"fwd-{d}": ("fwd", d, _STAGES[0], None, True) for d in _PTR},
    "fwd-fp32-strided": ("fwd", "fp32", _STAGES[0], None, False),
    **{f"bwd-{d}": ("bwd", d, _STAGES[0], (True, True), True) for d in _PTR},
    **{f"bwd-bf16-n{s[0]}": ("bwd", "bf16", s, (True, True), True) for s in _STAGES[1:]},
    "bwd-fp32-gx-only": ("bwd", "fp32", _STAGES[0], (True, False), True),
    "bwd-fp32-goff-only": ("bwd", "fp32", _STAGES[0], (False, True), True),
    "bwd-fp32-strided": ("bwd", "fp32", _STAGES[0], (True, True), False),
    # fused gather-GEMM (needs = (bias, tf32)): every dtype at stages 1 and 4 (the narrowest and
    # the widest column tiles), the half types at stages 2 and 3, no bias, TF32, a strided build
    **{f"fc-{d}": ("fc", d, _STAGES[0], (True, False), True) for d in _PTR},
    **{f"fc-{d}-n512": ("fc", d, _STAGES[3], (True, False), True) for d in _PTR},
    **{f"fc-{d}-n320": ("fc", d, _STAGES[2], (True, False), True) for d in ("fp16", "bf16")},
    "fc-bf16-n128": ("fc", "bf16", _STAGES[1], (True, False), True),
    "fc-fp32-nobias": ("fc", "fp32", _STAGES[0], (False, False), True),
    "fc-fp32-tf32": ("fc", "fp32", _STAGES[2], (True, True), True),
    "fc-bf16-strided": ("fc", "bf16", _STAGES[3], (True, False), False),
}


def _arg_values(fn, dtype, stage, unit_strides):
    """The runtime arguments of a launch on ActiveMLP's contiguous [128, n, n, C] activations
    (axis "w"), for sm90_compile.jit_signature; without unit_strides every channel stride is
    an unknown run-time value (a strided view)."""
    n, C, share = stage
    x = torch.empty(128, n, n, C, device="meta")
    off = torch.empty(128, n, n, C // share, device="meta")
    values = dict(M=128 * n * n, L=n, N=n, C=C, G=C // share, C_OUT=C, sw_n=C, sw_k=1, s_bias=1)
    for prefix, t in (("sx", x), ("sy", x), ("sg", x), ("sgx", x), ("so", off), ("sgo", off)):
        last = "g" if t is off else "c"
        values.update(zip((f"{prefix}_b", f"{prefix}_l", f"{prefix}_p", f"{prefix}_{last}"), K._line_strides(t, "w")))
    if not unit_strides:
        values.update({name: "i32" for name in _UNIT_STRIDES})
    values.update({name: _PTR[dtype] for name in fn.arg_names if name.endswith("_ptr")})
    return values


def _build(kernel, dtype, stage, needs, unit_strides):
    """Compile one kernel for sm_90 with the block sizes the GPU heuristics choose, its
    arguments specialised as the JIT specialises a launch on the stage's activations."""
    n, C, share = stage
    compute = tl.float64 if dtype == "fp64" else tl.float32
    if kernel == "fwd":
        fn, cfg = K._atm_sample_fwd_kernel, K.forward_blocks(128 * n * n, C)
        consts = dict(SHARE=share, UNIT_C=unit_strides, COMPUTE=compute, IDX64=False, BLOCK_M=cfg.m, BLOCK_C=cfg.c)
        options = dict(num_warps=cfg.num_warps)
    elif kernel == "fc":
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
        fn, cfg = K._atm_fc_fwd_kernel, K.fc_blocks(128 * n * n, C, C, torch_dtype, unit_strides)
        has_bias, tf32 = needs
        dot_dtype, _, precision = dot_dtypes(torch_dtype)
        consts = dict(
            SHARE=share, HAS_BIAS=has_bias, COMPUTE=compute, DOT_DTYPE=dot_dtype,
            PRECISION="tf32" if tf32 else precision, IDX64=False, BLOCK_M=cfg.m, BLOCK_N=cfg.n, BLOCK_K=cfg.k,
        )
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        fn, cfg = K._atm_sample_bwd_kernel, K.backward_blocks(n, C, share)
        consts = dict(SHARE=share, COMPUTE=compute, NEED_GX=needs[0], NEED_GOFF=needs[1], SHARE_P=cfg.share_p,
                      BLOCK_Q=cfg.q, BLOCK_G=cfg.g, TARGET_BLOCKS=cfg.target_blocks)
        options = dict(num_warps=cfg.num_warps)
    signature, consts, attrs = sm90_compile.jit_signature(fn, _arg_values(fn, dtype, stage, unit_strides), consts)
    return sm90_compile.compile_sm90(fn, signature, consts, options, attrs, cfg=dataclasses.asdict(cfg))


def _build_all():
    """Child-process entry point (sm90_compile.run_builds)."""
    sm90_compile.build_all(_BUILDS, _build)


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_compile.run_builds("test_atm_triton", timeout=600)


@pytest.mark.parametrize("build", list(_BUILDS))
def test_kernel_compiles_for_sm90(sm90_builds, build):
    sm90_compile.assert_built(sm90_builds[build])


def warps_per_sm(build: dict) -> int:
    """Warps an sm_90 SM holds of a build, as its registers allow (64K registers per SM,
    allocated per warp in steps of 8 per thread)."""
    regs = -(-build["registers"] // 8) * 8
    warps = build["cfg"]["num_warps"]
    return 65536 // (regs * 32 * warps) * warps


@pytest.mark.parametrize("build", [b for b in _BUILDS if b.startswith("fc-") and "strided" not in b
                                   and "fp64" not in b])
def test_fc_builds_hold_16_warps_per_sm(sm90_builds, build):
    """The fused gather-GEMM's wide column tiles still leave 16 warps per SM (the tiles before
    them: 8, at 138 registers for 8 warps)."""
    got = sm90_builds[build]
    assert warps_per_sm(got) >= 16, (got["registers"], got["cfg"])


_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp64": 64}


@pytest.mark.parametrize("dtype", list(_PTR))
def test_forward_gather_vectorises_unit_channel_runs(sm90_builds, dtype):
    """With unit channel strides (stage 1: share 2) every global load of the forward gather --
    the group offsets and both lerp corners of each group's channel run -- and every store is
    a vector wider than one element; the strided build (channel strides unknown) keeps to
    element-wide accesses, i.e. no contiguity is assumed that a view could break."""
    bits = _BITS[dtype]
    unit = sm90_builds[f"fwd-{dtype}"]
    assert unit["load_bits"] and min(unit["load_bits"]) > bits, unit["load_bits"]
    assert min(unit["store_bits"]) > bits, unit["store_bits"]
    if dtype == "fp32":
        strided = sm90_builds["fwd-fp32-strided"]
        assert set(strided["load_bits"]) == {bits} and set(strided["store_bits"]) == {bits}


# --- GPU ---------------------------------------------------------------------------------------

_GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=str)
@pytest.mark.parametrize("stage", _STAGES, ids=str)
@pytest.mark.parametrize("axis", AXES)
def test_cuda_matches_reference(axis, stage, dtype):
    n, C, share = stage
    shape = (4, n, n, C)
    for kind in ("normal1", "normal5", "edges"):
        x, off = strided_inputs(shape, share, axis, kind, dtype, "cuda")
        g = torch.randn(shape, dtype=torch.float64).to(dtype).cuda()
        xg, og = x.detach().requires_grad_(), off.detach().requires_grad_()
        out = mixops.atm_sample(xg, og, axis=axis, share=share, backend="triton")
        gx, go = torch.autograd.grad(out, (xg, og), g)
        ref, want_x, want_o = _reference_grads(x, off, g, axis, share)
        assert_close(out, ref, dtype, name=f"out {kind}")
        assert_close(gx, want_x, dtype, name=f"grad x {kind}")
        assert_close(go, want_o, dtype, name=f"grad offset {kind}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=str)
@pytest.mark.parametrize("axis", AXES)
def test_cuda_canary_and_awkward_sizes(axis, dtype):
    share = 3
    x, off = strided_inputs(AWKWARD, share, axis, "normal5", dtype, "cuda")
    g = torch.randn(AWKWARD, dtype=torch.float64).to(dtype).cuda()
    buf, out, inside = _canary(AWKWARD, dtype, "cuda")
    buf_x, gx, in_x = _canary(AWKWARD, dtype, "cuda")
    buf_o, go, in_o = _canary(off.shape, dtype, "cuda")
    K.launch_forward(x, off, out, axis, share)
    K.launch_backward(g, x, off, gx, go, axis, share)
    for b, i, name in ((buf, inside, "out"), (buf_x, in_x, "grad x"), (buf_o, in_o, "grad offset")):
        _untouched(b, i, name)
    ref, want_x, want_o = _reference_grads(x, off, g, axis, share)
    assert_close(out, ref, dtype, name="out")
    assert_close(gx, want_x, dtype, name="grad x")
    assert_close(go, want_o, dtype, name="grad offset")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=str)
@pytest.mark.parametrize("stage", _STAGES, ids=str)
@pytest.mark.parametrize("axis", AXES)
def test_cuda_fc_matches_reference(axis, stage, dtype):
    """The fused gather-GEMM and its backward at the ActiveMLP stage shapes (C_out = C)."""
    n, C, share = stage
    shape = (4, n, n, C)
    x, off = strided_inputs(shape, share, axis, "normal5", dtype, "cuda")
    w, b = _fc_params(C, C, dtype, "cuda")
    g = torch.randn(shape, dtype=torch.float64).to(dtype).cuda()
    leaves = [t.detach().requires_grad_() for t in (x, off, w, b)]
    out = mixops.atm_fc(*leaves, axis=axis, share=share, backend="triton")
    grads = torch.autograd.grad(out, leaves, g)
    ref, want = _fc_reference(x, off, w, b, g, axis, share)
    assert_close(out, ref, dtype, name="out")
    for got, exp, name in zip(grads, want, ("x", "offset", "weight", "bias")):
        assert_close(got, exp, dtype, name=f"grad {name}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=str)
@pytest.mark.parametrize("axis", AXES)
def test_cuda_fc_canary_and_awkward_sizes(axis, dtype):
    B, H, W, C = AWKWARD
    for share in (1, 2, 4, 8):
        for c_out in FC_OUTS:
            x, off = strided_inputs(AWKWARD, share, axis, "normal5", dtype, "cuda")
            w, b = _fc_params(c_out, C, dtype, "cuda")
            buf, out, inside = _canary((B, H, W, c_out), dtype, "cuda")
            K.launch_fc_forward(x, off, w, b, out, axis, share)
            _untouched(buf, inside, "out")
            ref = R.atm_fc_lerp(*(t.double().cpu() for t in (x, off, w, b)), axis, share)
            assert_close(out, ref, dtype, name=f"out share {share} c_out {c_out}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", AXES)
def test_cuda_backward_is_bit_identical(axis, dtype):
    shape = (16, 56, 56, 64)
    x = torch.randn(shape, device="cuda").to(dtype)
    off = (torch.randint(-3, 4, (*shape[:-1], 32), device="cuda") + 0.5).to(dtype)
    g = torch.randn(shape, device="cuda").to(dtype)
    runs = [K.backward([g], [True, True], x, off, axis, 2) for _ in range(3)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a, b)


@pytest.mark.needs_cuda
@pytest.mark.slow
def test_cuda_more_than_2_31_elements():
    """Index arithmetic in int64: the last image of a > 2**31-element fp16 tensor."""
    B, H, W, C, share = 2, 1024, 1024, 1040, 8
    assert B * H * W * C > 2**31
    x = torch.randn(B, H, W, C, device="cuda", dtype=torch.float16)
    off = (torch.randn(B, H, W, C // share, device="cuda") * 3).half()
    for axis, rows in (("w", (slice(-1, None), slice(-2, None))), ("h", (slice(-1, None), slice(None)))):
        out = K.forward(x, off, axis, share)
        g = torch.ones_like(x)
        gx, go = K.backward([g], [True, True], x, off, axis, share)
        # lines of one image are independent: the reference on the last rows / all columns of
        # the last channel groups of the last image
        cs = slice(C - 16, C)
        gs = slice((C - 16) // share, C // share)
        xs, os_ = x[rows][..., cs], off[rows][..., gs]
        ref, want_x, want_o = _reference_grads(xs, os_, g[rows][..., cs], axis, share)
        assert_close(out[rows][..., cs], ref, torch.float16, name=f"out {axis}")
        assert_close(gx[rows][..., cs], want_x, torch.float16, name=f"grad x {axis}")
        assert_close(go[rows][..., gs], want_o, torch.float16, name=f"grad offset {axis}")
        del out, gx, go


@pytest.mark.parametrize("axis", ["w", "h"])
def test_inf_gradient_reaches_only_its_own_targets(axis):
    """An inf in the incoming gradient spoils only the two gX targets it is scattered to (as
    in the reference and torchvision), not every element of its line."""
    x = torch.randn(1, 5, 6, 4, dtype=torch.float64, requires_grad=True)
    off = (torch.rand(1, 5, 6, 4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    g = torch.randn(1, 5, 6, 4, dtype=torch.float64)
    g[0, 2, 3, 1] = float("inf")
    grads = {}
    for name in ("torch", "triton"):
        out = mixops.atm_sample(x, off, axis=axis, backend=name)
        (grads[name],) = torch.autograd.grad(out, x, g)
    ok = torch.isfinite(grads["torch"])
    assert torch.equal(torch.isfinite(grads["triton"]), ok)
    assert (~ok).sum() <= 2
    torch.testing.assert_close(grads["triton"][ok], grads["torch"][ok])
