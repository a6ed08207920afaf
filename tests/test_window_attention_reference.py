"""The window-attention reference against independent formulations written from docs/window_attention.md.

- padding="bias": per-window loop over the real tokens only, with the *virtual key* of section 2.6
  (k = b_k, v = b_v, logit scale*q.b_k + ln(n_pad)) standing in for the n_pad padded keys
  (section 2.6); gradients too (section 2.7);
- padding="bias" on a module: the literal official flow (zero-pad the LayerNorm output, then
  the qkv Linear) against qkv computed on the unpadded map plus bias rows;
- padding="mask": the same loop with the padded keys simply dropped;
- global (2-D and video): a per-query loop over every key;
- the window index maps of section 2.5 and the stage-3 block choice of section 2.2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixops.nn.uniformer import SABlock_Windows
from mixops.reference import window_attention as ref

D = 8  # head dim used throughout: small and fast
HEADS = 2
C = HEADS * D


def _rand_qkv(B, H, W, bias=True, dtype=torch.float64, heads=HEADS):
    c = heads * D
    qkv = torch.randn(B, H, W, 3 * c, dtype=dtype)
    b = torch.randn(3 * c, dtype=dtype) if bias else None
    return qkv, b


def loop_windows(qkv, heads, ws, scale, bias, mode):
    """Independent per-window loop over real tokens only.

    mode "virtual": the padded keys of an edge window collapse into one key k = b_k, v = b_v
    whose logit is scale*q.b_k + ln(n_pad) (docs/window_attention.md section 2.6); mode "drop": padded keys are ignored.
    """
    B, H, W, C3 = qkv.shape
    c = C3 // 3
    d = c // heads
    if bias is None:
        bias = qkv.new_zeros(C3)
    out = qkv.new_zeros(B, H, W, c)
    for b in range(B):
        for i in range(math.ceil(H / ws)):
            for j in range(math.ceil(W / ws)):
                r0, r1 = i * ws, min((i + 1) * ws, H)
                c0, c1 = j * ws, min((j + 1) * ws, W)
                tokens = qkv[b, r0:r1, c0:c1].reshape(-1, C3)
                n_pad = ws * ws - tokens.shape[0]
                for h in range(heads):
                    q = tokens[:, h * d:(h + 1) * d]
                    k = tokens[:, c + h * d:c + (h + 1) * d]
                    v = tokens[:, 2 * c + h * d:2 * c + (h + 1) * d]
                    logits = scale * (q @ k.T)
                    if mode == "virtual" and n_pad > 0:
                        bk = bias[c + h * d:c + (h + 1) * d]
                        bv = bias[2 * c + h * d:2 * c + (h + 1) * d]
                        extra = scale * (q @ bk) + math.log(n_pad)
                        logits = torch.cat([logits, extra[:, None]], dim=1)
                        v = torch.cat([v, bv[None]], dim=0)
                    p = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
                    p = p / p.sum(dim=1, keepdim=True)
                    out[b, r0:r1, c0:c1, h * d:(h + 1) * d] = (p @ v).reshape(r1 - r0, c1 - c0, d)
    return out


def loop_global(qkv, heads, scale):
    """Independent global attention: each query pixel against every pixel (any rank >= 3)."""
    lead, C3 = qkv.shape[:-1], qkv.shape[-1]
    c = C3 // 3
    d = c // heads
    out = qkv.new_zeros(*lead, c)
    B = lead[0]
    for b in range(B):
        pix = list(torch.cartesian_prod(*[torch.arange(n) for n in lead[1:]]).reshape(-1, len(lead) - 1))
        tokens = torch.stack([qkv[(b, *p.tolist())] for p in pix])
        for h in range(heads):
            q = tokens[:, h * d:(h + 1) * d]
            k = tokens[:, c + h * d:c + (h + 1) * d]
            v = tokens[:, 2 * c + h * d:2 * c + (h + 1) * d]
            w = torch.exp(scale * torch.einsum("nd,md->nm", q, k))
            o = (w / w.sum(1, keepdim=True)) @ v
            for n, p in enumerate(pix):
                out[(b, *p.tolist())][h * d:(h + 1) * d] = o[n]
    return out


# (B, H, W) per window size: divisible, H % ws = 1, W % ws = ws - 1, H < ws, W < ws, both < ws
def _shapes(ws):
    return {
        "divisible": (2 * ws, ws),
        "h_mod_1": (ws + 1, 2 * ws),
        "w_mod_ws-1": (ws, 2 * ws - 1),
        "h_lt_ws": (ws - 1, 2 * ws),
        "w_lt_ws": (2 * ws, ws - 2),
        "both_lt_ws": (ws - 2, ws - 1),
    }


MATRIX = [
    pytest.param(B, ws, *hw, bias, id=f"B{B}-ws{ws}-{kind}-{'bias' if bias else 'nobias'}")
    for ws in (3, 4, 5)
    for kind, hw in _shapes(ws).items()
    for bias in (True, False)
    for B in (1, 2)
]


@pytest.mark.parametrize("B, ws, H, W, bias", MATRIX)
def test_bias_padding_equals_virtual_key(B, ws, H, W, bias):
    qkv, b = _rand_qkv(B, H, W, bias)
    scale = D ** -0.5
    out = ref.window_attention(qkv, HEADS, ws, scale, "bias", b)
    assert_same(out, loop_windows(qkv, HEADS, ws, scale, b, "virtual"))


@pytest.mark.parametrize("B, ws, H, W, bias", MATRIX)
def test_mask_padding_equals_dropped_keys(B, ws, H, W, bias):
    qkv, b = _rand_qkv(B, H, W, bias)
    scale = 0.3
    out = ref.window_attention(qkv, HEADS, ws, scale, "mask", b)
    assert_same(out, loop_windows(qkv, HEADS, ws, scale, None, "drop"))


@pytest.mark.parametrize("H, W, ws", [(17, 15, 14), (50, 20, 14), (32, 42, 32)])
def test_official_window_sizes(H, W, ws):
    """ws = 14 (detection) on a non-divisible map, and ws = 32 on ADE20K's 32x42 (docs/window_attention.md section 2.11)."""
    qkv, b = _rand_qkv(1, H, W)
    out = ref.window_attention(qkv, HEADS, ws, D ** -0.5, "bias", b)
    assert_same(out, loop_windows(qkv, HEADS, ws, D ** -0.5, b, "virtual"))


def test_bias_and_mask_differ_on_padded_maps():
    """Not masking matters (docs/window_attention.md section 2.6 reports 3.3 at C = 64); only edge windows change."""
    qkv, b = _rand_qkv(1, 7, 5)
    biased = ref.window_attention(qkv, HEADS, 3, D ** -0.5, "bias", b)
    masked = ref.window_attention(qkv, HEADS, 3, D ** -0.5, "mask", b)
    assert (biased - masked).abs().max() > 1e-2
    torch.testing.assert_close(biased[:, :6, :3], masked[:, :6, :3], rtol=0, atol=1e-12)


def test_virtual_key_gradients():
    """docs/window_attention.md section 2.7: same dqkv / dbias as the virtual-key form; b_q gets nothing from the padding."""
    qkv, b = _rand_qkv(2, 5, 7)
    qkv.requires_grad_(True)
    b.requires_grad_(True)
    g = torch.randn(2, 5, 7, C, dtype=torch.float64)
    grads = torch.autograd.grad(ref.window_attention(qkv, HEADS, 3, 0.35, "bias", b), (qkv, b), g)
    want = torch.autograd.grad(loop_windows(qkv, HEADS, 3, 0.35, b, "virtual"), (qkv, b), g)
    assert_same(grads[0], want[0])
    assert_same(grads[1], want[1])
    assert torch.equal(grads[1][:C], torch.zeros(C, dtype=torch.float64))
    assert grads[1][C:].abs().min() > 0


@pytest.mark.parametrize("H, W, ws", [(7, 9, 4), (3, 2, 5), (8, 8, 4)])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_bias_rows_equal_zero_padded_layernorm_output(H, W, ws, qkv_bias):
    """The official flow (pad the LN output, then qkv Linear per window) == qkv + bias rows."""
    m = SABlock_Windows(C, HEADS, window_size=ws, qkv_bias=qkv_bias).double()
    with torch.no_grad():
        if qkv_bias:
            m.attn.qkv.bias.normal_()
        m.attn.proj.bias.normal_()
    y = torch.randn(2, H, W, C, dtype=torch.float64)

    pad_r, pad_b = (ws - W % ws) % ws, (ws - H % ws) % ws
    yp = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    win = ref.window_partition(yp, ws).view(-1, ws * ws, C)
    official = ref.window_reverse(ref.attention_forward(m.attn, win).view(-1, ws, ws, C), ws, H + pad_b, W + pad_r)
    official = official[:, :H, :W]

    qkv = F.linear(y, m.attn.qkv.weight, m.attn.qkv.bias)
    core = ref.window_attention(qkv, HEADS, ws, m.attn.scale, "bias", m.attn.qkv.bias)
    assert_same(F.linear(core, m.attn.proj.weight, m.attn.proj.bias), official)


@pytest.mark.parametrize("padding", ["bias", "mask"])
def test_single_full_window_equals_global(padding):
    """H = W = ws: one window, no padding, identical to global attention (docs/window_attention.md section 2.11 item 3)."""
    qkv, b = _rand_qkv(2, 5, 5)
    win = ref.window_attention(qkv, HEADS, 5, 0.2, padding, b)
    assert_same(win, ref.window_attention(qkv, HEADS, None, 0.2, padding, b))


def test_window_larger_than_map():
    """ws > H and W: one window; with bias padding it still sees the padded keys, masked it is global."""
    qkv, b = _rand_qkv(1, 3, 4)
    glob = ref.window_attention(qkv, HEADS, None, 0.3, "bias", b)
    assert_same(ref.window_attention(qkv, HEADS, 6, 0.3, "mask", b), glob)
    biased = ref.window_attention(qkv, HEADS, 6, 0.3, "bias", b)
    assert_same(biased, loop_windows(qkv, HEADS, 6, 0.3, b, "virtual"))
    assert (biased - glob).abs().max() > 1e-2


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 2, 3, 4)])
def test_global_equals_loop(shape):
    """Global attention over all H*W (2-D) or T*H*W (video) tokens."""
    qkv = torch.randn(*shape, 3 * C, dtype=torch.float64)
    out = ref.window_attention(qkv, HEADS, None, 0.4, "bias", None)
    assert_same(out, loop_global(qkv, HEADS, 0.4))


def test_window_partition_index_map():
    """docs/window_attention.md section 2.5: window w = b*nH*nW + i*nW + j, token t = r*ws + c, pixel (i*ws + r, j*ws + c)."""
    B, Hp, Wp, ws = 2, 6, 9, 3
    x = torch.arange(B * Hp * Wp, dtype=torch.float64).reshape(B, Hp, Wp, 1)
    win = ref.window_partition(x, ws).view(-1, ws * ws)
    nH, nW = Hp // ws, Wp // ws
    for b in range(B):
        for i in range(nH):
            for j in range(nW):
                for r in range(ws):
                    for c in range(ws):
                        assert win[b * nH * nW + i * nW + j, r * ws + c] == x[b, i * ws + r, j * ws + c, 0]
    assert torch.equal(ref.window_reverse(ref.window_partition(x, ws), ws, Hp, Wp), x)


def test_stage3_block_types():
    """docs/window_attention.md section 2.2: Small (8) and Base (20) hybrid patterns; windows overrides hybrid."""
    small = ref.stage3_block_types(8, windows=False, hybrid=True)
    assert [i for i, t in enumerate(small) if t == "global"] == [3, 7]
    assert [i for i, t in enumerate(small) if t == "window"] == [0, 1, 2, 4, 5, 6]
    base = ref.stage3_block_types(20, windows=False, hybrid=True)
    assert [i for i, t in enumerate(base) if t == "global"] == [3, 7, 11, 15, 19]
    assert base.count("window") == 15
    assert ref.stage3_block_types(8, windows=True, hybrid=True) == ["window"] * 8
    assert ref.stage3_block_types(20, windows=True, hybrid=False) == ["window"] * 20
    assert ref.stage3_block_types(8, windows=False, hybrid=False) == ["global"] * 8


def assert_same(out, want):
    """float64 agreement of two exact formulations."""
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
