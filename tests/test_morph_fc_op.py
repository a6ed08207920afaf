"""The public op ``mixops.morph_fc``: against the reference, gradcheck, opcheck, awkward
layouts, backend plumbing and every documented error path."""
from __future__ import annotations

import math

import pytest
import torch

import mixops
from mixops.reference import morph_fc as ref
from mixops_testing import assert_close, cpu_and_cuda, only_backends, skip_unless_runs

f64 = torch.float64

# axis -> (x shape [B, T, H, W, C], segment_dim, FC width): wrap-around spatial geometry
# (W=6, L=8, H*W=24), non-square; temporal T=3, G=4, F=3*8/4
CASES = {
    "w": ((2, 3, 4, 6, 16), 8, 16),
    "h": ((2, 3, 4, 6, 16), 8, 16),
    "hs": ((2, 3, 4, 6, 16), 8, 16),
    "t": ((2, 3, 2, 3, 8), 4, 6),
}
TINY = {  # for gradcheck / opcheck
    "w": ((1, 2, 2, 3, 4), 2, 4),
    "h": ((1, 2, 2, 3, 4), 2, 4),
    "hs": ((1, 2, 2, 3, 4), 2, 4),
    "t": ((1, 3, 1, 2, 4), 2, 6),
}


def _make(case, dtype=f64, device="cpu", bias=True, requires_grad=False):
    shape, L, n = case
    x = torch.randn(shape, dtype=f64)
    w = torch.randn(n, n, dtype=f64) / math.sqrt(n)
    b = torch.randn(n, dtype=f64) if bias else None
    out = [t if t is None else t.to(dtype=dtype, device=device).requires_grad_(requires_grad) for t in (x, w, b)]
    return (*out, L)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("axis", list(CASES))
def test_op_matches_reference(axis, bias, dtype, device, backend):
    skip_unless_runs("morph_fc", backend, device)
    x, w, b, L = _make(CASES[axis], dtype, device, bias)
    out = mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend=backend)
    up = [t if t is None else t.to(f64) for t in (x, w, b)]
    expect = ref.morph_fc(*up, L, axis)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, expect, dtype)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("axis", ["w", "h", "hs"])
def test_op_image_input(axis, backend):
    """[B, H, W, C] is T = 1; the image-T stage-1 channels C=84, L=14 (D=6), chunks of 2 rows."""
    skip_unless_runs("morph_fc", backend, "cpu")
    x = torch.randn(2, 4, 7, 84, dtype=f64)
    w = torch.randn(84, 84, dtype=f64)
    b = torch.randn(84, dtype=f64)
    out = mixops.morph_fc(x, w, b, segment_dim=14, axis=axis, backend=backend)
    assert_close(out, ref.morph_fc(x.unsqueeze(1), w, b, 14, axis)[:, 0])


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("axis", list(CASES))
def test_op_non_contiguous_channels_last_view(axis, dtype, backend):
    """x as the channels-last view of a [B, C, T, H, W] tensor, and as a channel slice."""
    skip_unless_runs("morph_fc", backend, "cpu")
    (B, T, H, W, C), L, n = CASES[axis]
    _, w, b, _ = _make(CASES[axis], dtype)
    base = torch.randn(B, C, T, H, W, dtype=dtype)
    views = [base.permute(0, 2, 3, 4, 1), torch.randn(B, T, H, W, C + 3, dtype=dtype)[..., 2:2 + C]]
    for x in views:
        assert not x.is_contiguous()
        out = mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend=backend)
        expect = ref.morph_fc(x.contiguous().to(f64), w.to(f64), b.to(f64), L, axis)
        assert out.is_contiguous()
        assert_close(out, expect, dtype)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("axis", list(CASES))
def test_op_backward_matches_reference(axis, bias, backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    x, w, b, L = _make(CASES[axis], bias=bias)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # strided input through the backward
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn(x.shape, dtype=f64)
    grads = []
    for fn in (
        lambda *a: mixops.morph_fc(*a, segment_dim=L, axis=axis, backend=backend),
        lambda *a: ref.morph_fc(*a, L, axis),
    ):
        leaves = [t.detach().requires_grad_() for t in inputs]
        args = leaves if bias else [*leaves, None]
        grads.append(torch.autograd.grad((fn(*args) * g).sum(), leaves))
    for got, want in zip(*grads):
        assert_close(got, want)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("axis", list(TINY))
def test_gradcheck(axis, bias, backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    x, w, b, L = _make(TINY[axis], bias=bias, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: mixops.morph_fc(x, w, b, segment_dim=L, axis=axis, backend=backend),
        (x, w, b),
        fast_mode=True,
    )


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("axis", list(TINY))
def test_opcheck(axis, bias, backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    x, w, b, L = _make(TINY[axis], bias=bias, requires_grad=True)
    torch.library.opcheck(mixops.morph_fc.op, (x, w, b, L, axis, backend))


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("axis", list(CASES))
def test_deterministic(axis, device, backend):
    """Two runs give bit-identical outputs and gradients (DESIGN: backward kernels are
    deterministic)."""
    skip_unless_runs("morph_fc", backend, device)
    x, w, b, L = _make(CASES[axis], torch.float32, device)
    g = torch.randn(x.shape, device=device)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = mixops.morph_fc(*leaves, segment_dim=L, axis=axis, backend=backend)
        runs.append((out, *torch.autograd.grad((out * g).sum(), leaves)))
    for first, second, name in zip(*runs, ("output", "grad x", "grad weight", "grad bias")):
        assert torch.equal(first, second), f"{name} differs between two identical runs"


def test_backend_plumbing(monkeypatch):
    only_backends(monkeypatch, "morph_fc", "torch")
    x, w, b, L = _make(CASES["w"])
    with pytest.raises(ValueError, match="available: torch"):
        mixops.morph_fc(x, w, b, segment_dim=L, axis="w", backend="triton")
    with pytest.raises(ValueError, match="backend"):
        mixops.morph_fc(x, w, b, segment_dim=L, axis="w", backend="fast")
    assert mixops.available_backends("morph_fc")[0] == "torch"
    with mixops.use_backend("torch"):
        out = mixops.morph_fc(x, w, b, segment_dim=L, axis="w")
    assert_close(out, ref.morph_fc(x, w, b, L, "w"))


def _err(x, w, b=None, *, L=8, axis="w"):
    return mixops.morph_fc(x, w, b, segment_dim=L, axis=axis)


X = torch.randn(2, 3, 4, 6, 16)
W16 = torch.randn(16, 16)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: _err(X, W16, axis="c"), ValueError, "axis"),
        (lambda: _err(X, W16, axis=None), ValueError, "axis"),
        (lambda: _err(X[0, 0], W16), ValueError, "x must have 4 or 5 dimensions"),
        (lambda: _err(X[:, 0], torch.randn(8, 8), L=4, axis="t"), ValueError, "x must have 5"),
        (lambda: _err(X.tolist(), W16), TypeError, "x must be a torch.Tensor"),
        (lambda: _err(X.long(), W16), TypeError, "x must be float"),
        (lambda: _err(X, W16, L=0), ValueError, "segment_dim"),
        (lambda: _err(X, W16, L=8.0), TypeError, "segment_dim"),
        (lambda: _err(X, W16, L=True), TypeError, "segment_dim"),
        (lambda: _err(X, torch.randn(16, 16), L=6), ValueError, r"x channels.*segment_dim \(6\)"),
        (lambda: _err(torch.randn(2, 5, 5, 16), W16), ValueError, r"H\*W.*segment_dim \(8\)"),
        (lambda: _err(X, torch.randn(16, 8)), ValueError, r"weight must have shape \(16, 16\)"),
        (lambda: _err(X, torch.randn(16)), ValueError, "weight must have 2"),
        (lambda: _err(X, W16.double()), TypeError, "weight must have the dtype of x"),
        (lambda: _err(X, W16.to("meta")), ValueError, "weight must be on the device of x"),
        (lambda: _err(X, W16, torch.randn(15)), ValueError, r"bias must have shape \(16,\)"),
        (lambda: _err(X, W16, torch.randn(16).double()), TypeError, "bias must have the dtype"),
        (lambda: _err(X, W16, torch.randn(16, device="meta")), ValueError, "bias must be on the device"),
        (lambda: _err(X, W16, L=4, axis="t"), ValueError, r"weight must have shape \(12, 12\).*T\*C/segment_dim"),
        (lambda: _err(X, W16, L=5, axis="t"), ValueError, r"x channels.*segment_dim"),
        (lambda: _err(X, torch.randn(12, 12), torch.randn(16), L=4, axis="t"), ValueError, r"bias must have shape \(12,\)"),
    ],
)
def test_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
