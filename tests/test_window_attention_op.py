"""``mixops.window_attention``: against the reference, gradcheck, opcheck, strides, errors, backends.

Every test that computes with the op takes a ``backend`` argument: it runs once per backend
registered for ``window_attention`` (tests/conftest.py), always against the float64 reference.
"""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.reference import window_attention as ref
from mixops_testing import assert_close, only_backends, skip_unless_runs

OP = "window_attention"

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
@pytest.mark.op(OP)
def test_matches_reference(B, H, W, ws, padding, bias, dtype, backend):
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(B, H, W, bias=bias)
    want = ref.window_attention(qkv, HEADS, ws, D ** -0.5, padding, b)
    got = mixops.window_attention(
        qkv.to(dtype), num_heads=HEADS, window_size=ws, padding=padding,
        qkv_bias=None if b is None else b.to(dtype), backend=backend,
    )
    assert got.dtype == dtype and got.is_contiguous()
    assert_close(got, want, dtype=dtype)


@pytest.mark.op(OP)
def test_default_scale_and_explicit_scale(backend):
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(1, 5, 7)
    default = mixops.window_attention(qkv, num_heads=HEADS, window_size=3, qkv_bias=b, backend=backend)
    assert_close(default, ref.window_attention(qkv, HEADS, 3, D ** -0.5, "bias", b))
    scaled = mixops.window_attention(qkv, num_heads=HEADS, window_size=3, scale=1, qkv_bias=b, backend=backend)
    assert_close(scaled, ref.window_attention(qkv, HEADS, 3, 1.0, "bias", b))
    assert (scaled - default).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["transposed", "channel-slice", "strided-bias"])
@pytest.mark.op(OP)
def test_non_contiguous_inputs(layout, backend):
    """Views with arbitrary strides give the same result as their contiguous copies."""
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(2, 7, 5)
    if layout == "transposed":
        qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "channel-slice":
        qkv = torch.randn(2, 7, 5, 3 * C + 5, dtype=torch.float64)[..., 2:2 + 3 * C]
    else:
        b = torch.randn(2 * 3 * C, dtype=torch.float64)[::2]
    assert not (qkv.is_contiguous() and b.is_contiguous())
    got = mixops.window_attention(qkv, num_heads=HEADS, window_size=3, qkv_bias=b, backend=backend)
    want = ref.window_attention(qkv.contiguous(), HEADS, 3, D ** -0.5, "bias", b.contiguous())
    assert_close(got, want)


@pytest.mark.op(OP)
def test_video_global_is_global_over_thw(backend):
    """[B, T, H, W, 3C] global == [B, T*H, W, 3C] global (one sequence of T*H*W tokens)."""
    skip_unless_runs(OP, backend, "cpu")
    qkv, _ = _qkv(2, (3, 4), 5)
    got = mixops.window_attention(qkv, num_heads=HEADS, window_size=None, backend=backend)
    flat = ref.window_attention(qkv.reshape(2, 12, 5, 3 * C), HEADS, None, D ** -0.5, "bias", None)
    assert got.shape == (2, 3, 4, 5, C)
    assert_close(got.reshape(2, 12, 5, C), flat)


@pytest.mark.op(OP)
def test_video_stage3_token_count(backend):
    """UniFormer video stage 3 at 16x224^2: 8x14x14 = 1568 tokens attend jointly."""
    skip_unless_runs(OP, backend, "cpu")
    qkv, _ = _qkv(1, (8, 14), 14, dtype=torch.float32)
    got = mixops.window_attention(qkv, num_heads=HEADS, window_size=None, backend=backend)
    seq = qkv.reshape(1, 1568, 3, HEADS, D).permute(2, 0, 3, 1, 4).double()
    want = torch.softmax(seq[0] @ seq[1].transpose(-1, -2) * D ** -0.5, -1) @ seq[2]
    assert_close(got, want.transpose(1, 2).reshape(1, 8, 14, 14, C), dtype=torch.float32)


@pytest.mark.parametrize("B, H, W, ws, padding", CASES)
@pytest.mark.op(OP)
def test_backward_matches_reference(B, H, W, ws, padding, backend):
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(B, H, W)
    qkv.requires_grad_(True)
    b.requires_grad_(True)
    out = mixops.window_attention(
        qkv, num_heads=HEADS, window_size=ws, padding=padding, qkv_bias=b, backend=backend
    )
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
@pytest.mark.op(OP)
def test_gradcheck(B, H, W, ws, padding, bias, backend):
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(B, H, W, bias=bias, c=4)
    inputs = (qkv.requires_grad_(True),) + ((b.requires_grad_(True),) if bias else ())

    def f(qkv, b=None):
        return mixops.window_attention(
            qkv, num_heads=2, window_size=ws, padding=padding, qkv_bias=b, backend=backend
        )

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B, H, W, ws, padding", GRAD_CASES)
@pytest.mark.op(OP)
def test_opcheck(B, H, W, ws, padding, bias, backend):
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(B, H, W, bias=bias, c=4)
    qkv.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    torch.library.opcheck(mixops.window_attention.op, (qkv, 2, ws, 0.5, padding, b, backend))


@pytest.mark.parametrize("padding", ["bias", "mask"])
@pytest.mark.parametrize("ws", [3, None])
@pytest.mark.op(OP)
def test_backward_is_deterministic(ws, padding, backend):
    """Two runs give bit-identical outputs and gradients (padded edge windows included)."""
    skip_unless_runs(OP, backend, "cpu")
    qkv, b = _qkv(2, 7, 5, dtype=torch.float32)
    leaves = (qkv.requires_grad_(True), b.requires_grad_(True))
    g = torch.randn(2, 7, 5, C)
    runs = []
    for _ in range(2):
        out = mixops.window_attention(
            qkv, num_heads=HEADS, window_size=ws, padding=padding, qkv_bias=b, backend=backend
        )
        runs.append((out, *torch.autograd.grad(out, leaves, g)))
    for name, a, e in zip(("out", "dqkv", "dqkv_bias"), *runs):
        assert torch.equal(a, e), f"{name} differs between two identical runs"


def test_backend_selection(monkeypatch):
    only_backends(monkeypatch, OP, "torch")  # what follows must not depend on which kernels exist
    qkv, b = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match="available: torch"):
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
