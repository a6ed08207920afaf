"""The MorphFC reference against loop-level restatements of docs/morph_fc.md (sections
4.2, 4.3, 5, 6, 7, 11), in float64.

The loops below use only that page's index formulas (token of chunk k at position p, feature
``p*D + s``), never a reshape of the official code, so they are an independent oracle.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixops.nn.morph_fc import MorphFC_S, MorphFC_S2, PermutatorBlock
from mixops.reference import morph_fc as ref
from mixops_testing import assert_close

f64 = torch.float64

# (H, W, L, C): wrap-around (W % L != 0, H % L != 0, H*W % L == 0, non-square); chunks inside
# rows; chunks of two full rows (stage-3 like); the image-T config C=84, L=14 (D=6)
GEOMETRIES = [(4, 6, 8, 16), (3, 8, 4, 8), (6, 4, 8, 16), (2, 7, 14, 84)]


def token(axis: str, k: int, p: int, H: int, W: int, L: int) -> tuple[int, int]:
    """(h, w) of position p of chunk k (docs/morph_fc.md sections 4.2 and 5)."""
    if axis == "w":
        return divmod(k * L + p, W)  # row-major n = h*W + w
    if axis == "h":
        w, h = divmod(k * L + p, H)  # column-major m = w*H + h
        return h, w
    return divmod(p * (H * W // L) + k, W)  # "hs": n = p*(N/L) + k


def loop_spatial(x, weight, bias, L, axis):
    """docs/morph_fc.md sections 4.2 / 5, one (b, t, k, g) FC row at a time. x: [B, T, H, W, C]."""
    B, T, H, W, C = x.shape
    D = C // L
    y = torch.full_like(x, math.nan)
    for b in range(B):
        for t in range(T):
            for k in range(H * W // L):
                toks = [token(axis, k, p, H, W, L) for p in range(L)]
                for g in range(L):
                    v = torch.cat([x[b, t, h, w, g * D:(g + 1) * D] for h, w in toks])
                    u = weight @ v + (0 if bias is None else bias)
                    for p, (h, w) in enumerate(toks):
                        y[b, t, h, w, g * D:(g + 1) * D] = u[p * D:(p + 1) * D]
    assert not torch.isnan(y).any(), "some output element was never written"
    return y


def loop_temporal(x, weight, bias, G):
    """docs/morph_fc.md section 6, one (b, h, w, g) clip row at a time. x: [B, T, H, W, C]."""
    B, T, H, W, C = x.shape
    Dt = C // G
    y = torch.full_like(x, math.nan)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                for g in range(G):
                    v = torch.cat([x[b, t, h, w, g * Dt:(g + 1) * Dt] for t in range(T)])
                    u = weight @ v + (0 if bias is None else bias)
                    for t in range(T):
                        y[b, t, h, w, g * Dt:(g + 1) * Dt] = u[t * Dt:(t + 1) * Dt]
    assert not torch.isnan(y).any()
    return y


def _inputs(shape, n, bias):
    x = torch.randn(shape, dtype=f64)
    w = torch.randn(n, n, dtype=f64) / math.sqrt(n)
    b = torch.randn(n, dtype=f64) if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [None, 3])  # None: image [B, H, W, C]
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("axis", ["w", "h", "hs"])
def test_spatial_reference_matches_loops(axis, geom, T, bias):
    H, W, L, C = geom
    shape = (2, H, W, C) if T is None else (2, T, H, W, C)
    x, w, b = _inputs(shape, C, bias)
    out = ref.morph_fc(x, w, b, L, axis)
    x5 = x if T is not None else x.unsqueeze(1)
    expect = loop_spatial(x5, w, b, L, axis).reshape(shape)
    assert_close(out, expect)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "T,G,C,H,W",
    [(3, 4, 8, 2, 3), (8, 8, 16, 2, 2), (16, 14, 392, 1, 2)],  # video T=3; 16-frame G=8; 32-frame F=448
)
def test_temporal_reference_matches_loops(T, G, C, H, W, bias):
    F_ = T * C // G
    x, w, b = _inputs((2, T, H, W, C), F_, bias)
    assert_close(ref.morph_fc(x, w, b, G, "t"), loop_temporal(x, w, b, G))


@pytest.mark.parametrize("axis", ["w", "h", "hs", "t"])
def test_reference_gradients_match_loops(axis):
    H, W, L, C = 4, 6, 8, 16
    G = 4
    n = 3 * C // G if axis == "t" else C
    x, w, b = _inputs((1, 3, H, W, C), n, True)
    g = torch.randn_like(x)
    grads = []
    for fn in (
        lambda x, w, b: ref.morph_fc(x, w, b, G if axis == "t" else L, axis),
        lambda x, w, b: loop_temporal(x, w, b, G) if axis == "t" else loop_spatial(x, w, b, L, axis),
    ):
        xs = [t.clone().requires_grad_() for t in (x, w, b)]
        grads.append(torch.autograd.grad((fn(*xs) * g).sum(), xs))
    for got, want, name in zip(*grads, ("x", "weight", "bias")):
        assert_close(got, want, name=f"grad {name}")


@pytest.mark.parametrize("axis", ["w", "h", "hs"])
def test_bias_indexed_by_chunk_position_and_group_channel(axis):
    """With a zero weight the branch output at (tok(k, p), g*D + s) is bias[p*D + s]."""
    H, W, L, C = 4, 6, 8, 16
    D = C // L
    x = torch.randn(1, 1, H, W, C, dtype=f64)
    bias = torch.arange(C, dtype=f64)
    y = ref.morph_fc(x, torch.zeros(C, C, dtype=f64), bias, L, axis)
    for k in range(H * W // L):
        for p in range(L):
            h, w = token(axis, k, p, H, W, L)
            expect = torch.cat([bias[p * D:(p + 1) * D]] * L)  # same for every group g
            assert torch.equal(y[0, 0, h, w], expect)


@pytest.mark.parametrize("geom", [(4, 6, 8, 16), (6, 4, 8, 16)])
@pytest.mark.parametrize("axis", ["w", "h", "hs"])
def test_branch_mean_identity(axis, geom):
    """docs/morph_fc.md section 11: mean_{T,H,W}(branch)[g*D+s] = (1/N_tot) sum_p (Wt @ Xbar_g)[p*D+s]
    + (1/L) sum_p bias[p*D+s], with Xbar_g[p*D+s] = sum over t, k of x[t, tok(k, p), g*D+s]."""
    H, W, L, C = geom
    B, T = 2, 3
    D = C // L
    x, w, b = _inputs((B, T, H, W, C), C, True)
    got = ref.morph_fc(x, w, b, L, axis).mean(dim=(1, 2, 3))
    xbar = torch.zeros(B, L, C, dtype=f64)  # [b, g, p*D + s]
    for k in range(H * W // L):
        for p in range(L):
            h, ww = token(axis, k, p, H, W, L)
            xbar[:, :, p * D:(p + 1) * D] += x[:, :, h, ww, :].sum(1).reshape(B, L, D)
    u = xbar @ w.T  # [b, g, p*D + s]
    pred = u.reshape(B, L, L, D).sum(2) / (T * H * W) + b.reshape(L, D).sum(0) / L  # [b, g, s]
    assert_close(got, pred.reshape(B, C))


def _reweighted(m, branches):
    """docs/morph_fc.md sections 4.3 / 5 written per channel: alpha[b, c, k] = softmax_k r[b, K*c + k]."""
    K = len(branches)
    a = sum(branches[1:], branches[0]).mean(dim=(1, 2, 3))
    r = F.linear(F.gelu(F.linear(a, m.reweight.fc1.weight, m.reweight.fc1.bias)), m.reweight.fc2.weight, m.reweight.fc2.bias)
    B, C = a.shape
    y = torch.zeros_like(branches[0])
    for c in range(C):
        e = torch.stack([r[:, K * c + k] for k in range(K)], 1).exp()
        alpha = e / e.sum(1, keepdim=True)
        for k in range(K):
            y[..., c] += branches[k][..., c] * alpha[:, k, None, None, None]
    return F.linear(y, m.proj.weight, m.proj.bias)


def _spatial_independent(m, x):
    L = m.segment_dim
    c = F.linear(x, m.mlp_c.weight, m.mlp_c.bias)
    h = loop_spatial(x, m.mlp_h.weight, m.mlp_h.bias, L, "h" if hasattr(m, "mlp_w") else "hs")
    if hasattr(m, "mlp_w"):
        return _reweighted(m, [h, loop_spatial(x, m.mlp_w.weight, m.mlp_w.bias, L, "w"), c])
    return _reweighted(m, [h, c])


@pytest.mark.parametrize("cls", [MorphFC_S, MorphFC_S2])
def test_spatial_module_reference_matches_spec(cls):
    m = cls(16, segment_dim=8, qkv_bias=True).double().eval()
    x = torch.randn(2, 3, 4, 6, 16, dtype=f64)
    fwd = ref.morph_fc_s_forward if cls is MorphFC_S else ref.morph_fc_s2_forward
    with torch.no_grad():
        assert_close(fwd(m, x), _spatial_independent(m, x))
        assert_close(fwd(m, x[:, 0]), _spatial_independent(m, x[:, :1])[:, 0], name="image input")


@pytest.mark.parametrize("mlp_fn", [MorphFC_S, MorphFC_S2])
def test_block_reference_skip_residual(mlp_fn):
    """docs/morph_fc.md section 7: xt feeds only the spatial MorphFC; the stream continues from x."""
    m = PermutatorBlock(16, 8, mlp_ratio=3, qkv_bias=True, mlp_fn=mlp_fn).double().eval()
    x = torch.randn(2, 8, 4, 6, 16, dtype=f64)  # 16-frame rule: G = 8 needs T = 8
    with torch.no_grad():
        t = m.t_fc
        tn = F.layer_norm(x, (16,), m.t_norm1.weight, m.t_norm1.bias, 1e-5)
        xt = x + F.linear(loop_temporal(tn, t.mlp_t.weight, t.mlp_t.bias, 8), t.proj.weight, t.proj.bias)
        y = x + _spatial_independent(m.fc, F.layer_norm(xt, (16,), m.norm1.weight, m.norm1.bias, 1e-5))
        n2 = F.layer_norm(y, (16,), m.norm2.weight, m.norm2.bias, 1e-5)
        y = y + F.linear(F.gelu(F.linear(n2, m.mlp.fc1.weight, m.mlp.fc1.bias)), m.mlp.fc2.weight, m.mlp.fc2.bias)
        got = ref.permutator_block_forward(m, x)
        assert_close(got, y)
        wrong = got + (xt - x)  # the reading where xt carries the stream
        assert (wrong - y).abs().max() > 1e-3
