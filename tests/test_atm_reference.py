"""The ATM reference (mixops.reference.atm) against formulations written here from docs/atm.md:
a per-element loop over the table of section 4.1, hand-worked gradient conventions (sections 4.2-4.3),
torchvision's deform_conv2d driven as the official ATMOp (section 5), the fusion identity (section 6)
and the offset schedule (section 7)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixops.nn.atm import ATMLayer, ActiveBlock
from mixops.reference import atm as R
from mixops_testing import assert_close
from test_atm_cases import KINDS, away_from_integers, make_offset, official_atm_op

SHARES = (1, 2, 4, 8)


# --- independent formulation: the table of docs/atm.md 4.1, one element at a time -------------------


def _lerp0_table(v: list[float], p: float) -> float:
    n = len(v)
    if p <= -1 or p >= n:
        return 0.0
    if p < 0:
        return (p + 1) * v[0]
    if p > n - 1:
        return (n - p) * v[n - 1]
    k = math.floor(p)
    f = p - k
    return v[k] if f == 0 else (1 - f) * v[k] + f * v[k + 1]


def _loop_sample(x: torch.Tensor, offset: torch.Tensor, axis: str, share: int) -> torch.Tensor:
    B, H, W, C = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    d = float(offset[b, i, j, c // share])
                    if axis == "w":
                        out[b, i, j, c] = _lerp0_table(x[b, i, :, c].tolist(), j + d)
                    else:
                        out[b, i, j, c] = _lerp0_table(x[b, :, j, c].tolist(), i + d)
    return out


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("axis", ["h", "w"])
@pytest.mark.parametrize("kind", KINDS)
def test_lerp_matches_table_loop(kind, axis, share):
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    off = make_offset(kind, (1, 3, 4, 8 // share), axis)
    assert_close(R.atm_sample_lerp(x, off, axis, share), _loop_sample(x, off, axis, share))
    assert_close(R.atm_sample(x, off, axis, share), _loop_sample(x, off, axis, share))


@pytest.mark.parametrize("axis", ["h", "w"])
def test_gradient_conventions_by_hand(axis):
    """docs/atm.md sections 4.2/4.3 on the row v = [1, 4, 9]: right-hand slope at integers, x[0] at p = -1,
    zero at p = n and beyond, value gradient only to k at exact integers."""
    v = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    ps = [-1.5, -1.0, -0.5, 0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    want_val = [0.0, 0.0, 0.5, 1.0, 4.0, 6.5, 9.0, 4.5, 0.0, 0.0]
    want_slope = [0.0, 1.0, 1.0, 3.0, 5.0, 5.0, -9.0, -9.0, 0.0, 0.0]
    B = len(ps)
    shape = (B, 3, 1, 1) if axis == "h" else (B, 1, 3, 1)
    x = v.view(1, *shape[1:]).expand(shape).clone().requires_grad_()
    off = torch.zeros(shape, dtype=torch.float64)
    first = (slice(None), 0, 0, 0)
    off[first] = torch.tensor(ps, dtype=torch.float64)  # position p at index 0 of the row
    off.requires_grad_()
    out = R.atm_sample_lerp(x, off, axis, 1)
    g = torch.zeros_like(out)
    g[first] = 1.0
    out.backward(g)
    assert out[first].tolist() == want_val
    assert off.grad[first].tolist() == want_slope
    row = x.grad.reshape(B, 3)
    assert row[ps.index(1.0)].tolist() == [0.0, 1.0, 0.0]  # exact integer: only k receives
    assert row[ps.index(-1.0)].tolist() == [0.0, 0.0, 0.0]
    assert row[ps.index(2.5)].tolist() == [0.0, 0.0, 0.5]  # the corner k+1 = n is dropped


def test_half_precision_positions_are_fp32():
    """fp16 storage, fp32 positions: 40 + 0.03 must not round to fp16's 1/32-px grid (40.03125)."""
    x = torch.zeros(1, 1, 64, 1, dtype=torch.float16)
    x[0, 0, 41, 0] = 1000.0
    off = torch.zeros(1, 1, 64, 1, dtype=torch.float16)
    off[0, 0, 40, 0] = 0.03
    out = R.atm_sample_lerp(x, off, "w", 1)
    assert out.dtype == torch.float16
    frac = float(off[0, 0, 40, 0])  # what fp16 stores, ~0.030014
    assert out[0, 0, 40, 0].item() == pytest.approx(1000 * frac, abs=0.02)  # not 31.25


# --- against torchvision's deform_conv2d driven as the official ATMOp --------------------------


def _deform_sample(x, off, axis, share):
    """The gather through the official drive with an identity 1x1 weight (exact: every other
    term of the GEMM is an exact zero)."""
    C = x.shape[-1]
    eye = torch.eye(C, dtype=x.dtype)[:, :, None, None]
    full = off.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)
    return official_atm_op(x.permute(0, 3, 1, 2), full, eye, None, axis).permute(0, 2, 3, 1)


def _grads(fn, x, off, g):
    x = x.clone().requires_grad_()
    off = off.clone().requires_grad_()
    out = fn(x, off)
    out.backward(g)
    return out.detach(), x.grad, off.grad


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("axis", ["h", "w"])
@pytest.mark.parametrize("kind", KINDS)
def test_lerp_vs_deform_conv2d(kind, axis, share):
    pytest.importorskip("torchvision")
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    off = make_offset(kind, (2, 5, 7, 16 // share), axis)
    g = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    out_l, gx_l, go_l = _grads(lambda a, o: R.atm_sample_lerp(a, o, axis, share), x, off, g)
    out_d, gx_d, go_d = _grads(lambda a, o: _deform_sample(a, o, axis, share), x, off, g)
    assert torch.equal(out_l, out_d), f"max error {(out_l - out_d).abs().max().item()}"
    assert_close(gx_l, gx_d, name="grad x")
    # compared directly, not by finite differences: at integers both take the right-hand slope
    assert_close(go_l, go_d, name="grad offset")


@pytest.mark.parametrize("axis", ["h", "w"])
@pytest.mark.parametrize("kind", ["normal1", "integer"])
def test_lerp_vs_deform_conv2d_float32_bit_exact(kind, axis):
    pytest.importorskip("torchvision")
    x = torch.randn(2, 6, 5, 8, dtype=torch.float32)
    off = make_offset(kind, (2, 6, 5, 4), axis, dtype=torch.float32) * 1.37
    out_l = R.atm_sample_lerp(x, off, axis, 2)
    out_d = _deform_sample(x, off, axis, 2)
    assert torch.equal(out_l, out_d), f"max error {(out_l - out_d).abs().max().item()}"


@pytest.mark.parametrize(
    "shape, share", [((1, 1, 6, 8), 4), ((3, 4, 1, 8), 8), ((1, 9, 2, 24), 8), ((2, 3, 11, 5), 1)]
)
@pytest.mark.parametrize("axis", ["h", "w"])
def test_lerp_vs_deform_conv2d_awkward_shapes(shape, share, axis):
    pytest.importorskip("torchvision")
    B, H, W, C = shape
    x = torch.randn(shape, dtype=torch.float64)
    off = make_offset("normal5", (B, H, W, C // share), axis)
    g = torch.randn(shape, dtype=torch.float64)
    out_l, gx_l, go_l = _grads(lambda a, o: R.atm_sample_lerp(a, o, axis, share), x, off, g)
    out_d, gx_d, go_d = _grads(lambda a, o: _deform_sample(a, o, axis, share), x, off, g)
    assert torch.equal(out_l, out_d)
    assert_close(gx_l, gx_d, name="grad x")
    assert_close(go_l, go_d, name="grad offset")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("axis", ["h", "w"])
def test_atm_fc_reference_vs_official_drive(axis, share, bias):
    """Forward and input/offset/weight/bias gradients, float64, against deform_conv2d driven
    exactly as the official ATMOp inside ATMLayer (repeat_interleave -> permute -> slots)."""
    pytest.importorskip("torchvision")
    B, H, W, C, Co = 2, 5, 6, 8, 7
    x = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    off = (torch.randn(B, H, W, C // share, dtype=torch.float64) * 2).requires_grad_()
    w = torch.randn(Co, C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(Co, dtype=torch.float64, requires_grad=True) if bias else None
    leaves = [t for t in (x, off, w, b) if t is not None]
    g = torch.randn(B, H, W, Co, dtype=torch.float64)

    out = R.atm_fc(x, off, w, b, axis, share)
    got = torch.autograd.grad(out, leaves, g)
    full = off.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)
    ref = official_atm_op(x.permute(0, 3, 1, 2), full, w[:, :, None, None], b, axis).permute(0, 2, 3, 1)
    want = torch.autograd.grad(ref, leaves, g)
    assert torch.equal(out, ref)
    for name, a, e in zip(["x", "offset", "weight", "bias"], got, want):
        assert_close(a, e, name=f"grad {name}")

    # the torch backend differentiates the reference with torch.func.vjp: same gradients
    _, vjp = torch.func.vjp(lambda *t: R.atm_fc(*t, b, axis, share), x, off, w)
    for name, a, e in zip(["x", "offset", "weight"], vjp(g), want):
        assert_close(a, e, name=f"vjp grad {name}")


def test_atm_op_forward_dilation_and_official_errors():
    """The module-level reference runs deform_conv2d with the module's own stride/padding/
    dilation, as the official ATMOp does: dilation is inert for a 1x1 kernel, padding breaks."""
    pytest.importorskip("torchvision")
    from mixops.nn.atm import ATMOp

    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    off = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    m = ATMOp(4, 3, dimension="w").double()
    md = ATMOp(4, 3, dilation=2, dimension="w").double()
    md.load_state_dict(m.state_dict())
    assert torch.equal(R.atm_op_forward(m, x, off), R.atm_op_forward(md, x, off))
    with pytest.raises(NotImplementedError, match="dimension"):
        R.atm_op_forward(ATMOp(4, 3).double(), x, off)
    with pytest.raises(RuntimeError):
        R.atm_op_forward(ATMOp(4, 3, padding=1, dimension="h").double(), x, off)


def test_without_torchvision_everything_uses_the_lerp(monkeypatch):
    """torchvision is a test extra only: without it atm_fc and atm_op_forward use the 1-D lerp."""
    from mixops.nn.atm import ATMOp

    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    off = torch.randn(2, 4, 5, 4, dtype=torch.float64) * 3
    w = torch.randn(6, 8, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    m = ATMOp(8, 6, dimension="h").double()
    x_nchw = x.permute(0, 3, 1, 2)
    off_nchw = off.repeat_interleave(2, dim=-1).permute(0, 3, 1, 2)
    with_tv = (R.atm_fc(x, off, w, b, "w", 2), R.atm_op_forward(m, x_nchw, off_nchw))

    monkeypatch.setattr(R, "_deform_conv2d", lambda: None)
    assert not R.deform_conv2d_available()
    assert torch.equal(R.atm_fc(x, off, w, b, "w", 2), R.atm_fc_lerp(x, off, w, b, "w", 2))
    assert_close(R.atm_fc(x, off, w, b, "w", 2), with_tv[0])
    assert_close(R.atm_op_forward(m, x_nchw, off_nchw), with_tv[1])
    with pytest.raises(ValueError, match="stride"):
        R.atm_op_forward(ATMOp(8, 6, stride=2, dimension="h").double(), x_nchw, off_nchw)
    with pytest.raises(NotImplementedError, match="dimension"):
        R.atm_op_forward(ATMOp(8, 6).double(), x_nchw, off_nchw)


def test_half_precision_atm_fc_runs_the_official_call_in_fp32():
    """fp16/bf16: deform_conv2d in fp32, cast back (torchvision's autocast rule), not the lerp."""
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    off = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    assert R.deform_conv2d_available()
    out = R.atm_fc(x.bfloat16(), off.bfloat16(), w.bfloat16(), None, "h", 1)
    want = R.atm_fc_deform(*(t.bfloat16().float() for t in (x, off, w)), None, "h", 1).bfloat16()
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)


@pytest.mark.parametrize("axis", ["h", "w"])
def test_gradcheck_lerp_fc(axis):
    """The lerp + FC form, which atm_fc uses for half precision and without torchvision."""
    B, H, W, C, share = 1, 3, 4, 4, 2
    x = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    off = away_from_integers((B, H, W, C // share)).requires_grad_()
    w = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, o, ww, bb: R.atm_fc_lerp(a, o, ww, bb, axis, share), (x, off, w, b), fast_mode=True
    )


# --- module-level pieces ---------------------------------------------------------------------


@pytest.mark.parametrize("share", SHARES)
def test_make_offset_repeat_interleave_and_split(share):
    """Channel c of each half uses compact offset c // S (repeat_interleave, not tile)."""
    C = 8
    blk = ActiveBlock(C, share_dim=share, new_offset=True).double()
    x = torch.randn(2, 3, 4, C, dtype=torch.float64)
    off = R.make_offset(blk.offset_layer, x, share)
    o = blk.offset_layer(x)  # [B,H,W,2C/S]
    G = C // share
    assert off.shape == (2, 2 * C, 3, 4)
    for c in range(C):
        assert torch.equal(off[:, c], o[..., c // share])
        assert torch.equal(off[:, C + c], o[..., G + c // share])


def test_fusion_identity_spec6():
    """mean_HW(w + h + c) from the means of the sampled features, and the layer as one GEMM
    with K = 3C and per-sample scaled weights (docs/atm.md section 6)."""
    B, H, W, C = 2, 5, 6, 8
    m = ATMLayer(C).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    offset = torch.randn(B, 2 * C, H, W, dtype=torch.float64) * 2
    off = offset.permute(0, 2, 3, 1)
    Ww, bw = m.atm_w.weight[:, :, 0, 0], m.atm_w.bias
    Wh, bh = m.atm_h.weight[:, :, 0, 0], m.atm_h.bias
    Wc = m.atm_c.weight
    sw = R.atm_sample(x, off[..., :C], "w", 1)
    sh = R.atm_sample(x, off[..., C:], "h", 1)
    w = R.atm_fc(x, off[..., :C], Ww, bw, "w", 1)
    h = R.atm_fc(x, off[..., C:], Wh, bh, "h", 1)
    c = F.linear(x, Wc)

    direct = (w + h + c).mean(dim=(1, 2))
    mean = lambda t: t.mean(dim=(1, 2))  # noqa: E731
    from_means = mean(sw) @ Ww.T + bw + mean(sh) @ Wh.T + bh + mean(x) @ Wc.T
    assert_close(from_means, direct, name="mean_HW(w + h + c)")

    alpha = R.mlp_forward(m.fusion, direct).reshape(B, C, 3).softmax(dim=-1)  # [B, C, (w,h,c)]
    Wcat = torch.cat([alpha[:, :, 0, None] * Ww, alpha[:, :, 1, None] * Wh, alpha[:, :, 2, None] * Wc], dim=2)
    feats = torch.cat([sw, sh, x], dim=-1).reshape(B, H * W, 3 * C)
    y = torch.einsum("bok,bpk->bpo", Wcat, feats) + (alpha[:, :, 0] * bw + alpha[:, :, 1] * bh)[:, None]
    out = F.linear(y.reshape(B, H, W, C), m.proj.weight, m.proj.bias)
    assert_close(out, R.atm_layer_forward(m, x, offset), name="one-GEMM layer")


def test_atm_layer_forward_rejects_bad_offset_shape():
    m = ATMLayer(8).double()
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="offset"):
        R.atm_layer_forward(m, x, torch.zeros(1, 8, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "depths, intv, want",
    [
        ([2, 2, 4, 2], 2, [[0], [0], [0, 2], [0]]),  # xT
        ([2, 3, 10, 3], 2, [[0], [0], [0, 2, 4, 6, 8], [0]]),  # T
        ([3, 4, 18, 3], 6, [[0], [0], [0, 6, 12], [0]]),  # S
        ([3, 8, 27, 3], 6, [[0], [0, 6], [0, 6, 12, 18, 24], [0]]),  # B
        ([3, 4, 24, 3], 6, [[0], [0], [0, 6, 12, 18], [0]]),  # L
    ],
    ids=["xT", "T", "S", "B", "L"],
)
def test_offset_schedule_table(depths, intv, want):
    assert R.offset_schedule(depths, intv) == want
