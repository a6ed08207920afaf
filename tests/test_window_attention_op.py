"""``mixops.window_attention``: against the reference, gradcheck, opcheck, strides, errors, backends."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.reference import window_attention as ref
from mixops_testing import assert_close

HEADS, D = 2, 8
C = HEADS * D

# (B, H, W, window_size, padding): padded and unpadded windows, ws > map, global, video global
CASES = [
    pytest.param(2, 7, 5, 3, "bias", id="bias-padded"),
    pytest.param(1, 8, 8, 4, "bias", id="bias-divisible"),
    pytest.param(2, 3, 4, 5, "bias", id="bias-ws-gt-map"),
    pytest.param(2, 7, 5, 3, "mask", id="mask-padded"),
    pytest.param(1, 4, 6, 5, "mask", id="mask-ws-gt-h"),
    pytest.param(2, 5, 6, None, "bias", id="global"),
    pytest.param(2, (2, 3), 4, None, "bias", id="video-global"),
]


def _qkv(B, H, W, dtype=torch.float64, bias=True, c=C):
    lead = (B, *H, W) if isinstance(H, tuple) else (B, H, W)
    qkv = torch.randn(*lead, 3 * c, dtype=dtype)
    b = torch.randn(3 * c, dtype=dtype) if bias else None
    return qkv, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(B, H, W, ws, padding, bias, dtype):
    qkv, b = _qkv(B, H, W, bias=bias)
    want = ref.window_attention(qkv, HEADS, ws, D ** -0.5, padding, b)
    got = mixops.window_attention(
        qkv.to(dtype), num_heads=HEADS, window_size=ws, padding=padding,
        qkv_bias=None if b is None else b.to(dtype),
    )
    assert got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype=dtype)


def test_default_scale_and_explicit_scale():
    qkv, b = _qkv(1, 5, 7)
    default = mixops.window_attention(qkv, num_heads=HEADS, window_size=3, qkv_bias=b)
    assert_close(default, ref.window_attention(qkv, HEADS, 3, D ** -0.5, "bias", b))
    scaled = mixops.window_attention(qkv, num_heads=HEADS, window_size=3, scale=1, qkv_bias=b)
    assert_close(scaled, ref.window_attention(qkv, HEADS, 3, 1.0, "bias", b))
    assert (scaled - default).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["transposed", "channel-slice", "strided-bias"])
def test_non_contiguous_inputs(layout):
    """Views with arbitrary strides give the same result as their contiguous copies."""
    qkv, b = _qkv(2, 7, 5)
    if layout == "transposed":
        qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "channel-slice":
        qkv = torch.randn(2, 7, 5, 3 * C + 5, dtype=torch.float64)[..., 2:2 + 3 * C]
    else:
        b = torch.randn(2 * 3 * C, dtype=torch.float64)[::2]
    assert not (qkv.is_contiguous() and b.is_contiguous())
    got = mixops.window_attention(qkv, num_heads=HEADS, window_size=3, qkv_bias=b)
    want = ref.window_attention(qkv.contiguous(), HEADS, 3, D ** -0.5, "bias", b.contiguous())
    assert_close(got, want)


def test_video_global_is_global_over_thw():
    """[B, T, H, W, 3C] global == [B, T*H, W, 3C] global (one sequence of T*H*W tokens)."""
    qkv, _ = _qkv(2, (3, 4), 5)
    got = mixops.window_attention(qkv, num_heads=HEADS, window_size=None)
    flat = mixops.window_attention(qkv.reshape(2, 12, 5, 3 * C), num_heads=HEADS, window_size=None)
    assert got.shape == (2, 3, 4, 5, C)
    assert_close(got.reshape(2, 12, 5, C), flat)


def test_video_stage3_token_count():
    """UniFormer video stage 3 at 16x224^2: 8x14x14 = 1568 tokens attend jointly."""
    qkv, _ = _qkv(1, (8, 14), 14, dtype=torch.float32)
    got = mixops.window_attention(qkv, num_heads=HEADS, window_size=None)
    seq = qkv.reshape(1, 1568, 3, HEADS, D).permute(2, 0, 3, 1, 4).double()
    want = torch.softmax(seq[0] @ seq[1].transpose(-1, -2) * D ** -0.5, -1) @ seq[2]
    assert_close(got, want.transpose(1, 2).reshape(1, 8, 14, 14, C), dtype=torch.float32)


@pytest.mark.parametrize("B, H, W, ws, padding", CASES)
def test_backward_matches_reference(B, H, W, ws, padding):
    qkv, b = _qkv(B, H, W)
    qkv.requires_grad_(True)
    b.requires_grad_(True)
    out = mixops.window_attention(qkv, num_heads=HEADS, window_size=ws, padding=padding, qkv_bias=b)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, b), g)
    # unpadded and global maps do not read qkv_bias: its gradient is zero
    want = torch.autograd.grad(
        ref.window_attention(qkv, HEADS, ws, D ** -0.5, padding, b), (qkv, b), g, materialize_grads=True
    )
    assert_close(got[0], want[0], name="dqkv")
    assert_close(got[1], want[1], name="dqkv_bias")


GRAD_CASES = [
    pytest.param(1, 3, 5, 2, "bias", id="bias"),
    pytest.param(1, 3, 5, 2, "mask", id="mask"),
    pytest.param(2, 2, 3, None, "bias", id="global"),
    pytest.param(1, (2, 2), 2, None, "bias", id="video-global"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", GRAD_CASES)
def test_gradcheck(B, H, W, ws, padding, bias):
    qkv, b = _qkv(B, H, W, bias=bias, c=4)
    inputs = (qkv.requires_grad_(True),) + ((b.requires_grad_(True),) if bias else ())

    def f(qkv, b=None):
        return mixops.window_attention(qkv, num_heads=2, window_size=ws, padding=padding, qkv_bias=b)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", GRAD_CASES)
def test_opcheck(B, H, W, ws, padding, bias):
    qkv, b = _qkv(B, H, W, bias=bias, c=4)
    qkv.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    torch.library.opcheck(mixops.window_attention.op, (qkv, 2, ws, 0.5, padding, b, "torch"))


def test_backend_selection():
    qkv, b = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match="available"):
        mixops.window_attention(qkv, num_heads=HEADS, window_size=2, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        mixops.window_attention(qkv, num_heads=HEADS, window_size=2, backend="bogus")
    with mixops.use_backend("torch"):
        got = mixops.window_attention(qkv, num_heads=HEADS, window_size=2, qkv_bias=b)
    assert_close(got, ref.window_attention(qkv, HEADS, 2, D ** -0.5, "bias", b))


def _call(qkv=None, **kw):
    args = dict(num_heads=HEADS, window_size=3)
    args.update(kw)
    return mixops.window_attention(torch.randn(1, 4, 4, 3 * C) if qkv is None else qkv, **args)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(qkv=torch.randn(4, 4, 3 * C)), ValueError, "qkv"),
        (dict(qkv=torch.randn(1, 1, 4, 4, 4, 3 * C)), ValueError, "qkv"),
        (dict(qkv=torch.randn(1, 4, 4, 3 * C + 1)), ValueError, "qkv"),
        (dict(qkv=torch.zeros(1, 4, 4, 3 * C, dtype=torch.int32)), TypeError, "qkv"),
        (dict(qkv=torch.randn(1, 0, 4, 3 * C)), ValueError, "qkv"),
        ([1, 2, 3], TypeError, "qkv"),
        (dict(num_heads=3), ValueError, "num_heads"),
        (dict(num_heads=0), ValueError, "num_heads"),
        (dict(num_heads=2.0), TypeError, "num_heads"),
        (dict(qkv_bias=torch.randn(C)), ValueError, "qkv_bias"),
        (dict(qkv_bias=torch.randn(3 * C, dtype=torch.float64)), TypeError, "qkv_bias"),
        (dict(qkv_bias=torch.randn(3 * C, device="meta")), ValueError, "qkv_bias"),
        (dict(window_size=0), ValueError, "window_size"),
        (dict(window_size=3.0), TypeError, "window_size"),
        (dict(window_size=(3, 3)), TypeError, "window_size"),
        (dict(window_size=True), TypeError, "window_size"),
        (dict(qkv=torch.randn(1, 2, 4, 4, 3 * C), window_size=2), ValueError, "window_size"),
        (dict(padding="zeros"), ValueError, "padding"),
        (dict(scale="0.1"), TypeError, "scale"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        if isinstance(kwargs, dict):
            _call(**kwargs)
        else:
            _call(qkv=kwargs)
