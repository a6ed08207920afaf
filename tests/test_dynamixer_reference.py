"""The DynaMixer reference against formulations written here from docs/dynamixer.md (section 3), float64.

The loop formulation follows the pseudo-code one sequence, one segment and one output token at a
time, with an explicit softmax over the source token; the index formulation gathers by the flat
index maps (compress ``s*d + k``, generate input ``l*d + k``, logit ``p*N + q``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixops
from mixops.reference import dynamixer as ref
from mixops_testing import assert_close

# (B', N, C, S, d)
SHAPES = [(3, 5, 6, 3, 2), (2, 4, 8, 2, 3), (1, 3, 5, 1, 1), (2, 6, 8, 4, 8)]


def make_inputs(bp, n, c, s, d, dtype=torch.float64, logit_scale=1.0):
    """x and the compress/generate Linear parameters; logit_scale sharpens the softmax."""
    x = torch.randn(bp, n, c, dtype=dtype)
    cw = torch.randn(s * d, c, dtype=dtype) / c**0.5
    cb = torch.randn(s * d, dtype=dtype) * 0.1
    gw = torch.randn(n * n, n * d, dtype=dtype) * logit_scale / (n * d) ** 0.5
    gb = torch.randn(n * n, dtype=dtype) * 0.1
    return x, cw, cb, gw, gb


def loop_mix(x, cw, cb, gw, gb, num_head, reduced_dim):
    """docs/dynamixer.md section 3, one (sequence b, segment s, output token q) at a time."""
    bp, n, c = x.shape
    S, d, e = num_head, reduced_dim, c // num_head
    out = []
    for b in range(bp):
        # compress is dense over all C channels: r[l] has S*d features, segment-major
        r = [cw @ x[b, l] + cb for l in range(n)]
        tokens = [[None] * S for _ in range(n)]
        for s in range(S):
            # generate input for segment s: token-major, l*d + k
            z = torch.cat([r[l][s * d:(s + 1) * d] for l in range(n)])
            g = gw @ z + gb  # the same generate Linear for every segment
            for q in range(n):
                col = torch.stack([g[p * n + q] for p in range(n)])  # logits over sources p
                w = torch.exp(col - col.max())
                w = w / w.sum()
                tokens[q][s] = sum(w[p] * x[b, p, s * e:(s + 1) * e] for p in range(n))
        out.append(torch.stack([torch.cat(tokens[q]) for q in range(n)]))
    return torch.stack(out)


def index_mix(x, cw, cb, gw, gb, num_head, reduced_dim):
    """docs/dynamixer.md section 3.2 index maps, gathered with explicit index tensors."""
    bp, n, c = x.shape
    S, d, e = num_head, reduced_dim, c // num_head
    r = x @ cw.T + cb  # [B', N, S*d]
    flat = torch.arange(n * d)
    l, k = flat // d, flat % d
    seg = torch.arange(S)
    z = r[:, l[None, :], seg[:, None] * d + k[None, :]]  # [B', S, N*d]: z[b,s,l*d+k] = r[b,l,s*d+k]
    g = z @ gw.T + gb  # [B', S, N*N]
    p_idx = torch.arange(n)[:, None]
    q_idx = torch.arange(n)[None, :]
    logits = g[:, :, p_idx * n + q_idx]  # [B', S, p, q]
    mix = torch.exp(logits - logits.amax(dim=2, keepdim=True))
    mix = mix / mix.sum(dim=2, keepdim=True)
    ch = seg[:, None] * e + torch.arange(e)[None, :]  # [S, C/S]: channel s*(C/S) + e
    xs = x[:, :, ch]  # [B', N, S, C/S]
    y = torch.einsum("bspq,bpse->bqse", mix, xs)
    return y.reshape(bp, n, c)


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_loop_forward(shape):
    bp, n, c, s, d = shape
    inputs = make_inputs(*shape, logit_scale=3.0)
    assert_close(ref.dynamixer_mix(*inputs, s, d), loop_mix(*inputs, s, d), name="reference vs loop")


@pytest.mark.parametrize("shape", SHAPES)
def test_index_formulation_matches_loop(shape):
    bp, n, c, s, d = shape
    inputs = make_inputs(*shape, logit_scale=3.0)
    assert_close(index_mix(*inputs, s, d), loop_mix(*inputs, s, d), name="index vs loop")


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_reference_matches_loop_gradients(shape):
    bp, n, c, s, d = shape
    inputs = [t.requires_grad_() for t in make_inputs(*shape, logit_scale=3.0)]
    grad_out = torch.randn(bp, n, c, dtype=torch.float64)
    got = torch.autograd.grad(ref.dynamixer_mix(*inputs, s, d), inputs, grad_out)
    want = torch.autograd.grad(loop_mix(*inputs, s, d), inputs, grad_out)
    for name, g, w in zip(("x", "compress_weight", "compress_bias", "generate_weight", "generate_bias"), got, want):
        assert_close(g, w, name=f"grad {name}")


def test_softmax_last_axis_misreading_differs():
    """The "softmax(-1), then P @ X" reading gives a clearly different answer: the tests above
    (tolerance 1e-10) would catch it."""
    bp, n, c, s, d = 3, 6, 8, 2, 2
    inputs = make_inputs(bp, n, c, s, d, logit_scale=3.0)
    x, cw, cb, gw, gb = inputs
    r = (x @ cw.T + cb).reshape(bp, n, s, d).transpose(1, 2).reshape(bp, s, n * d)
    logits = (r @ gw.T + gb).reshape(bp, s, n, n)
    xs = x.reshape(bp, n, s, c // s).transpose(1, 2)  # [B', S, N, C/S]
    wrong = (torch.softmax(logits, dim=-1) @ xs).transpose(1, 2).reshape(bp, n, c)
    right = (torch.softmax(logits, dim=-2).transpose(-1, -2) @ xs).transpose(1, 2).reshape(bp, n, c)
    assert_close(ref.dynamixer_mix(*inputs, s, d), right, name="column-softmax form")
    assert float((wrong - right).abs().max()) > 0.1


def test_each_output_token_is_a_convex_combination_of_its_segment():
    """Mixing constant tokens returns them unchanged (P's columns sum to one) and the segments
    never exchange channels."""
    bp, n, c, s, d = 2, 5, 6, 3, 2
    x, cw, cb, gw, gb = make_inputs(bp, n, c, s, d, logit_scale=3.0)
    const = x[:, :1, :].expand(bp, n, c)
    assert_close(ref.dynamixer_mix(const, cw, cb, gw, gb, s, d), const, name="constant tokens")


def test_compress_is_dense_over_all_channels():
    """Changing only segment 1's channels changes segment 0's mixing (docs/dynamixer.md section 6 item 3)."""
    bp, n, c, s, d = 1, 5, 6, 3, 2
    x, cw, cb, gw, gb = make_inputs(bp, n, c, s, d, logit_scale=3.0)
    x2 = x.clone()
    x2[..., 2:4] += torch.randn(bp, n, 2, dtype=x.dtype)
    y1 = ref.dynamixer_mix(x, cw, cb, gw, gb, s, d)[..., 0:2]
    y2 = ref.dynamixer_mix(x2, cw, cb, gw, gb, s, d)[..., 0:2]
    assert float((y1 - y2).abs().max()) > 1e-3


def spec_block(m, x):
    """docs/dynamixer.md section 3 DynaMixerBlock, with the index-form mixing and index-form reweighting."""
    B, H, W, C = x.shape

    def op(mod, seqs):
        y = index_mix(seqs, mod.compress.weight, mod.compress.bias, mod.generate.weight,
                      mod.generate.bias, mod.num_head, mod.reduced_dim)
        return y @ mod.out.weight.T + mod.out.bias

    h = op(m.mix_h, x.transpose(1, 2).reshape(B * W, H, C)).reshape(B, W, H, C).transpose(1, 2)
    w = op(m.mix_w, x.reshape(B * H, W, C)).reshape(B, H, W, C)
    c = x @ m.mlp_c.weight.T
    a = (h + w + c).mean(dim=(1, 2))
    hid = F.gelu(a @ m.reweight.fc1.weight.T + m.reweight.fc1.bias)
    logits = hid @ m.reweight.fc2.weight.T + m.reweight.fc2.bias  # [B, 3C]
    chan = torch.arange(C)
    al = torch.stack([logits[:, 3 * chan + k] for k in range(3)], dim=-1).softmax(dim=-1)  # [B, C, 3]
    y = sum(al[:, None, None, :, k] * branch for k, branch in enumerate((h, w, c)))
    return y @ m.proj.weight.T + m.proj.bias


def test_reference_block_matches_spec_block():
    torch.manual_seed(1)
    m = mixops.nn.DynaMixerBlock(8, resolution=4, num_head=2, reduced_dim=2).double()
    with torch.no_grad():  # sharper reweighting and mixing, so a swapped branch would show
        m.reweight.fc2.weight.mul_(8.0)
        m.mix_h.generate.weight.mul_(4.0)
        m.mix_w.generate.weight.mul_(4.0)
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    assert_close(ref.dynamixer_block_forward(m, x), spec_block(m, x), name="block reference vs spec")
