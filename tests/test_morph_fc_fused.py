"""The internal op of the fused MorphFC layer path, ``mixops::_morph_branch`` (branch output +
fp32 token mean), on every backend: against the float64 reference, all gradients (incl.
through the mean), wrap-around chunks, stage-4 strided chunks, C not a power of two, the
channel FC, non-contiguous inputs, gradcheck, opcheck, determinism."""
from __future__ import annotations

import math

import pytest
import torch
from mixops_testing import assert_close, cpu_and_cuda, skip_unless_runs

from mixops.backend import available_backends
from mixops.ops.morph_fc_fused import morph_branch
from mixops.reference import morph_fc as ref

f64 = torch.float64

# (axis, x shape, segment_dim): wrap-around chunks (L = 4 divides neither W = 10 nor H = 6,
# H*W does), "hs" strided, T > 1, "t" temporal, the channel FC; C = 84 / L = 14 (image-T
# stage 1, D = 6) and one 7x7 stage-4 frame with C = 588, L = 49 (D = 12)
CASES = [
    ("w", (2, 3, 6, 10, 20), 4),
    ("h", (1, 2, 6, 10, 20), 4),
    ("hs", (2, 1, 6, 10, 20), 4),
    ("t", (2, 5, 2, 3, 16), 4),
    ("c", (3, 2, 3, 5, 20), 1),
    ("w", (1, 4, 7, 84), 14),
    ("hs", (1, 7, 7, 588), 49),
]


def _inputs(shape, L, axis, dtype=f64, device="cpu"):
    C = shape[-1]
    F = shape[1] * C // L if axis == "t" else C
    x = torch.randn(shape, dtype=f64)
    w = torch.randn(F, F, dtype=f64) / math.sqrt(F)
    b = torch.randn(F, dtype=f64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def _check(backend, axis, x, w, b, L, dtype=f64):
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y, mean = morph_branch(*leaves, segment_dim=L, axis=axis, backend=backend)
    exp_leaves = [t.detach().to(f64).requires_grad_() for t in (x, w, b)]
    ey, emean = ref.morph_branch(*exp_leaves, L, axis)
    assert y.shape == x.shape and mean.shape == (x.shape[0], x.shape[-1])
    assert mean.dtype == (f64 if dtype == f64 else torch.float32)
    assert_close(y, ey, dtype)
    assert_close(mean, emean, dtype, name="mean")
    gy = torch.randn(y.shape, dtype=f64)
    gm = torch.randn(mean.shape, dtype=f64) * 10
    got = torch.autograd.grad([y, mean], leaves, [gy.to(y), gm.to(mean)])
    want = torch.autograd.grad([ey, emean], exp_leaves, [gy, gm])
    for a, e, n in zip(got, want, ("x", "weight", "bias")):
        assert_close(a, e, dtype, name=f"grad {n}")


@pytest.mark.op("_morph_branch")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_branch_matches_reference(case, backend):
    axis, shape, L = case
    skip_unless_runs("_morph_branch", backend, "cpu")
    _check(backend, axis, *_inputs(shape, L, axis), L)


@pytest.mark.op("_morph_branch")
@pytest.mark.parametrize("axis", ["h", "c"])
def test_branch_float32_and_channels_last_view(axis, backend):
    """fp32 against the fp64 reference; x a channels-last view of a channels-first tensor."""
    skip_unless_runs("_morph_branch", backend, "cpu")
    x, w, b = _inputs((2, 2, 6, 10, 20), 4, axis, torch.float32)
    x = x.movedim(-1, 1).contiguous().movedim(1, -1)
    assert not x.is_contiguous()
    _check(backend, axis, x, w, b, 4, torch.float32)


@pytest.mark.op("_morph_branch")
@pytest.mark.parametrize("axis", ["w", "hs", "c"])
def test_branch_gradcheck(axis, backend):
    skip_unless_runs("_morph_branch", backend, "cpu")
    x, w, b = (t.requires_grad_() for t in _inputs((2, 1, 2, 4, 8), 2, axis))

    def f(x, w, b):
        y, mean = morph_branch(x, w, b, segment_dim=2, axis=axis, backend=backend)
        return y, mean

    assert torch.autograd.gradcheck(f, (x, w, b), fast_mode=True)


@pytest.mark.op("_morph_branch")
@pytest.mark.parametrize("axis", ["h", "c"])
def test_branch_opcheck(axis, backend):
    skip_unless_runs("_morph_branch", backend, "cpu")
    x, w, b = _inputs((2, 1, 6, 10, 20), 4, axis)
    torch.library.opcheck(
        morph_branch.op, (x.requires_grad_(), w.requires_grad_(), b, 4, axis, backend)
    )


@pytest.mark.op("_morph_branch")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_branch_backward_is_deterministic(device, backend):
    skip_unless_runs("_morph_branch", backend, device)
    x, w, b = (t.requires_grad_() for t in _inputs((2, 2, 6, 10, 20), 4, "w", torch.float32, device))

    def grads():
        y, mean = morph_branch(x, w, b, segment_dim=4, axis="w", backend=backend)
        return torch.autograd.grad((y * y).sum() + (mean * mean).sum(), [x, w, b])

    for a, c in zip(grads(), grads()):
        assert torch.equal(a, c)


def test_branch_errors():
    x = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="axis"):
        morph_branch(x, torch.randn(8, 8), None, segment_dim=4, axis="q")
    with pytest.raises(ValueError, match=r"weight must have shape \(8, 8\)"):
        morph_branch(x, torch.randn(6, 6), None, segment_dim=4, axis="c")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        ("w", (2, 1, 56, 56, 112), 14),
        ("h", (2, 1, 14, 14, 392), 28),
        ("hs", (2, 1, 7, 7, 784), 49),
        ("c", (3, 1, 7, 7, 784), 1),
        ("c", (2, 2, 28, 28, 224), 1),
    ],
    ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}",
)
def test_gpu_branch_matches_float64(case, dtype, gpu_backend):
    if gpu_backend not in available_backends("_morph_branch"):
        pytest.skip(f"no {gpu_backend} backend here")
    axis, shape, L = case
    _check(gpu_backend, axis, *_inputs(shape, L, axis, dtype, "cuda"), L, dtype)
