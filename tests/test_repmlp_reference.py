"""The RepMLP reference against independent loop-level models of docs/repmlp.md (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mixops.reference import repmlp as ref
from mixops_testing import assert_close

F64 = torch.float64


def _native_model(x, weight, bias, S, h, w):
    """docs/repmlp.md section 3.1: out[n, c] = reshape(W_{c%S} @ vec(x[n, c]) + b_{c%S}), one partition per map."""
    N, C = x.shape[:2]
    hw = h * w
    out = torch.empty_like(x)
    for n in range(N):
        for c in range(C):
            s = c % S
            W_s = weight[s * hw:(s + 1) * hw, :, 0, 0]
            b_s = bias[s * hw:(s + 1) * hw] if bias is not None else 0
            out[n, c] = (W_s @ x[n, c].reshape(hw) + b_s).reshape(h, w)
    return out


def _scramble_model(x, weight, bias, S, h, w):
    """docs/repmlp.md section 3.2: the official output map of the partition round trip, element by element.

    Row (n, i, j, q) carries channel q*S + s of partition (i, j) in share-set s; its FC output
    lands in channel c_o = (rho // (hp*wp))*S + s at partition (i', j'), rho = (i*wp + j)*Q + q.
    """
    N, C, H, W = x.shape
    hp, wp, Q, hw = H // h, W // w, C // S, h * w
    out = torch.full_like(x, float("nan"))
    for n in range(N):
        for i in range(hp):
            for j in range(wp):
                for q in range(Q):
                    rho = (i * wp + j) * Q + q
                    i2, j2 = (rho // wp) % hp, rho % wp
                    for s in range(S):
                        c_o = (rho // (hp * wp)) * S + s
                        v = x[n, q * S + s, i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(hw)
                        z = weight[s * hw:(s + 1) * hw, :, 0, 0] @ v
                        if bias is not None:
                            z = z + bias[s * hw:(s + 1) * hw]
                        out[n, c_o, i2 * h:(i2 + 1) * h, j2 * w:(j2 + 1) * w] = z.reshape(h, w)
    return out


def _unscrambled_model(x, weight, bias, S, h, w):
    """The paper's intent: each h x w partition of channel c through W_{c%S}, kept in place."""
    N, C, H, W = x.shape
    out = torch.empty_like(x)
    for i in range(H // h):
        for j in range(W // w):
            sl = (slice(None), slice(None), slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w))
            out[sl] = _native_model(x[sl].contiguous(), weight, bias, S, h, w)
    return out


def _fc(S, h, w, bias=True):
    hw = h * w
    weight = torch.randn(S * hw, hw, 1, 1, dtype=F64) / hw**0.5
    return weight, (torch.randn(S * hw, dtype=F64) if bias else None)


@pytest.mark.parametrize("C,S,h,w", [(6, 1, 4, 5), (6, 2, 4, 4), (6, 3, 3, 5), (6, 6, 4, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_partition_fc_native_resolution(C, S, h, w, bias):
    x = torch.randn(2, C, h, w, dtype=F64)
    weight, b = _fc(S, h, w, bias)
    out = ref.partition_fc(x, weight, b, None, (h, w), S)
    assert_close(out, _native_model(x, weight, b, S, h, w))


@pytest.mark.parametrize(
    "N,C,S,h,w,hp,wp",
    [
        (2, 3, 1, 3, 3, 2, 2),  # S = 1, C > 1: the scramble of a stage-1 block at 2x resolution
        (1, 8, 2, 2, 3, 2, 2),  # S > 1
        (2, 6, 3, 3, 2, 2, 3),  # hp != wp
    ],
)
def test_partition_fc_scramble_formula(N, C, S, h, w, hp, wp):
    x = torch.randn(N, C, hp * h, wp * w, dtype=F64)
    weight, b = _fc(S, h, w)
    out = ref.partition_fc(x, weight, b, None, (h, w), S)
    expected = _scramble_model(x, weight, b, S, h, w)
    assert not torch.isnan(expected).any(), "the docs/repmlp.md 3.2 map must write every output element"
    assert_close(out, expected)
    # the scramble is real here: the in-place (paper) mapping gives another answer
    assert not torch.allclose(out, _unscrambled_model(x, weight, b, S, h, w))


def test_partition_fc_no_scramble_when_one_channel_per_shareset():
    """S == C (Q == 1): the round trip is the identity even with several partitions."""
    x = torch.randn(2, 4, 6, 9, dtype=F64)
    weight, b = _fc(4, 3, 3)
    out = ref.partition_fc(x, weight, b, None, (3, 3), 4)
    assert_close(out, _unscrambled_model(x, weight, b, 4, 3, 3))


def _closed_form_fc(kernel, h, w):
    """docs/repmlp.md section 4.3: W_s[q, p] = kernel_s[py - qy + K//2, px - qx + K//2] inside the kernel, else 0."""
    S, _, K, _ = kernel.shape
    hw = h * w
    out = torch.zeros(S * hw, hw, dtype=kernel.dtype)
    for s in range(S):
        for qy in range(h):
            for qx in range(w):
                for py in range(h):
                    for px in range(w):
                        a, b = py - qy + K // 2, px - qx + K // 2
                        if 0 <= a < K and 0 <= b < K:
                            out[s * hw + qy * w + qx, py * w + px] = kernel[s, 0, a, b]
    return out


@pytest.mark.parametrize("S,K,h,w", [(1, 3, 4, 4), (2, 3, 3, 5), (3, 5, 4, 3), (2, 1, 3, 3), (1, 7, 3, 4)])
def test_locality_injection_closed_form(S, K, h, w):
    hw = h * w
    fc_weight, fc_bias = _fc(S, h, w)
    kernel = torch.randn(S, 1, K, K, dtype=F64)
    kernel_bias = torch.randn(S, dtype=F64)
    weight, bias = ref.locality_injection(fc_weight, fc_bias, kernel, kernel_bias, (h, w))
    assert weight.shape == (S * hw, hw, 1, 1)
    assert_close(weight[:, :, 0, 0], fc_weight[:, :, 0, 0] + _closed_form_fc(kernel, h, w))
    assert_close(bias, fc_bias + kernel_bias.repeat_interleave(hw))


@pytest.mark.parametrize("S,K,h,w", [(2, 3, 4, 5), (3, 5, 3, 3)])
def test_locality_injection_applies_the_conv_with_border_zero_padding(S, K, h, w):
    """The FC from a zero fc equals the depthwise conv on each h x w map, zero-padded at its border."""
    hw = h * w
    kernel = torch.randn(S, 1, K, K, dtype=F64)
    kernel_bias = torch.randn(S, dtype=F64)
    weight, bias = ref.locality_injection(
        torch.zeros(S * hw, hw, 1, 1, dtype=F64), None, kernel, kernel_bias, (h, w)
    )
    maps = torch.randn(5, S, h, w, dtype=F64)
    conv = torch.nn.functional.conv2d(maps, kernel, kernel_bias, padding=K // 2, groups=S)
    W = weight[:, :, 0, 0].reshape(S, hw, hw)
    fc = torch.einsum("sqp,nsp->nsq", W, maps.reshape(5, S, hw)) + bias.reshape(S, hw)
    assert_close(fc.reshape(5, S, h, w), conv)


def _random_bn(channels):
    bn = nn.BatchNorm2d(channels).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def test_fuse_bn_conv_branch():
    bn = _random_bn(3)
    kernel = torch.randn(3, 1, 3, 3, dtype=F64)
    w, b = ref.fuse_bn(kernel, bn)
    maps = torch.randn(2, 3, 5, 5, dtype=F64)
    y = bn(torch.nn.functional.conv2d(maps, kernel, padding=1, groups=3))
    assert_close(torch.nn.functional.conv2d(maps, w, b, padding=1, groups=3), y)


def test_fuse_bn_fc3_rows_use_their_shareset():
    S, hw, eps = 3, 4, 1e-5
    bn = _random_bn(S)
    weight = torch.randn(S * hw, hw, 1, 1, dtype=F64)
    w, b = ref.fuse_bn(weight, bn)
    want_w, want_b = torch.empty_like(weight), torch.empty(S * hw, dtype=F64)
    for row in range(S * hw):
        s = row // hw
        t = bn.weight[s] / (bn.running_var[s] + eps).sqrt()
        want_w[row] = weight[row] * t
        want_b[row] = bn.bias[s] - bn.running_mean[s] * t
    assert_close(w, want_w)
    assert_close(b, want_b)
