"""The internal op ``mixops::_reweighted_proj`` (proj of the reweighted branch sum) on every
backend: against the float64 reference, every gradient (branches, alpha, weight, bias), two
and three branches, C not a power of two, T > 1, images, non-contiguous branches, gradcheck,
opcheck, determinism, canary buffers around the Triton kernels' outputs, argument errors."""
from __future__ import annotations

import math

import pytest
import torch
from mixops_testing import assert_close, cpu_and_cuda, skip_unless_runs

from mixops.backend import available_backends
from mixops.ops.morph_fc_fused import reweighted_proj
from mixops.reference import morph_fc as ref

f64 = torch.float64

# (branch shape, K): awkward C (20, 36 = not powers of 2), T > 1, an image, and a token count
# that is not a multiple of the row tiles; batch items that share a row tile (dalpha slots)
CASES = [
    ((2, 3, 5, 7, 20), 3),
    ((3, 1, 4, 5, 36), 2),
    ((2, 6, 5, 84), 3),
    ((5, 2, 3, 3, 16), 2),
]


def _inputs(shape, K, dtype=f64, device="cpu"):
    B, C = shape[0], shape[-1]
    branches = [torch.randn(shape, dtype=f64) for _ in range(K)]
    alpha = torch.randn(B, C, K, dtype=f64).softmax(dim=2)
    w = torch.randn(C, C, dtype=f64) / math.sqrt(C)
    b = torch.randn(C, dtype=f64)
    adt = f64 if dtype == f64 else torch.float32
    return (
        [t.to(device=device, dtype=dtype) for t in branches],
        alpha.to(device=device, dtype=adt),
        w.to(device=device, dtype=dtype),
        b.to(device=device, dtype=dtype),
    )


def _ref(branches, alpha, w, b):
    b2 = branches[2] if len(branches) == 3 else None
    return ref.reweighted_proj(branches[0], branches[1], b2, alpha, w, b)


def _check(backend, branches, alpha, w, b, dtype=f64):
    K = len(branches)
    leaves = [t.detach().requires_grad_() for t in (*branches, alpha, w, b) if t is not None]
    exp_leaves = [t.detach().to(f64).requires_grad_() for t in leaves]
    bias, exp_bias = (leaves[-1], exp_leaves[-1]) if b is not None else (None, None)
    out = reweighted_proj(leaves[:K], leaves[K], leaves[K + 1], bias, backend=backend)
    expect = _ref(exp_leaves[:K], exp_leaves[K], exp_leaves[K + 1], exp_bias)
    assert out.shape == branches[0].shape and out.dtype == branches[0].dtype
    assert_close(out, expect, dtype)
    g = torch.randn(out.shape, dtype=f64)
    got = torch.autograd.grad(out, leaves, g.to(out))
    want = torch.autograd.grad(expect, exp_leaves, g)
    names = [f"branch {k}" for k in range(K)] + ["alpha", "weight", "bias"]
    for a, e, n in zip(got, want, names):
        assert_close(a, e, dtype, name=f"grad {n}")


@pytest.mark.op("_reweighted_proj")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"K{c[1]}-{'x'.join(map(str, c[0]))}")
def test_proj_matches_reference(case, backend):
    skip_unless_runs("_reweighted_proj", backend, "cpu")
    shape, K = case
    _check(backend, *_inputs(shape, K))


@pytest.mark.op("_reweighted_proj")
def test_proj_float32_non_contiguous_and_no_bias(backend):
    """fp32 against the fp64 reference; channels-last views of channels-first tensors (all
    branches alike, then one differing layout), no bias."""
    skip_unless_runs("_reweighted_proj", backend, "cpu")
    branches, alpha, w, _ = _inputs((2, 2, 4, 5, 20), 3, torch.float32)
    views = [t.movedim(-1, 1).contiguous().movedim(1, -1) for t in branches]
    assert not views[0].is_contiguous()
    _check(backend, views, alpha, w, None, torch.float32)
    _check(backend, [views[0], branches[1], views[2]], alpha, w, None, torch.float32)


@pytest.mark.op("_reweighted_proj")
@pytest.mark.parametrize("K", [2, 3])
def test_proj_gradcheck(K, backend):
    skip_unless_runs("_reweighted_proj", backend, "cpu")
    branches, alpha, w, b = _inputs((2, 1, 2, 3, 8), K)
    leaves = [t.requires_grad_() for t in (*branches, alpha, w, b)]

    def f(*args):
        return reweighted_proj(list(args[:K]), *args[K:], backend=backend)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


@pytest.mark.op("_reweighted_proj")
@pytest.mark.parametrize("K", [2, 3])
def test_proj_opcheck(K, backend):
    skip_unless_runs("_reweighted_proj", backend, "cpu")
    branches, alpha, w, b = _inputs((2, 1, 3, 5, 20), K)
    b2 = branches[2].requires_grad_() if K == 3 else None
    args = (branches[0].requires_grad_(), branches[1].requires_grad_(), b2, alpha.requires_grad_(), w, b, backend)
    torch.library.opcheck(reweighted_proj.op, args)


@pytest.mark.op("_reweighted_proj")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_proj_backward_is_deterministic(device, backend):
    skip_unless_runs("_reweighted_proj", backend, device)
    branches, alpha, w, b = _inputs((3, 2, 4, 5, 20), 3, torch.float32, device)
    leaves = [t.requires_grad_() for t in (*branches, alpha, w, b)]

    def grads():
        out = reweighted_proj(leaves[:3], *leaves[3:], backend=backend)
        return torch.autograd.grad((out * out).sum(), leaves)

    for a, c in zip(grads(), grads()):
        assert torch.equal(a, c)


def _canary(shape, dtype, pad=37):
    """A NaN-filled buffer and the view of ``shape`` in its middle (outputs the kernels must
    fill completely and never write past)."""
    n = math.prod(shape)
    buf = torch.full((n + 2 * pad,), float("nan"), dtype=dtype)
    return buf, buf[pad : pad + n].view(shape)


def _outside_untouched(buf, pad=37):
    return bool(torch.isnan(buf[:pad]).all() and torch.isnan(buf[-pad:]).all())


@pytest.mark.parametrize("K", [2, 3])
def test_proj_kernels_write_exactly_their_outputs(K):
    """The Triton launchers on NaN canary buffers: every output element written (no NaN left)
    and nothing outside (forward out, the K branch gradients, the dalpha partials)."""
    skip_unless_runs("_reweighted_proj", "triton", "cpu")
    from mixops.kernels import morph_fc as K_
    from mixops.kernels import morph_fc_proj as P

    shape = (3, 2, 3, 5, 20)
    branches, alpha, w, b = _inputs(shape, K, torch.float32)
    geo = K_.geometry(shape, 1, "c")
    buf, out = _canary(shape, torch.float32)
    K_.launch_gemm(branches[0], w, b, out, geo, transpose_weight=True, more=tuple(branches[1:]), alpha=alpha)
    assert _outside_untouched(buf)
    assert_close(out, _ref([t.double() for t in branches], alpha.double(), w.double(), b.double()), torch.float32)
    dy = torch.randn(shape)
    bufs, grads = zip(*(_canary(shape, torch.float32) for _ in range(K)))
    blocks = K_.gemm_blocks(geo.M, geo.F, torch.float32)
    part = K_.batch_partials(geo, blocks, K * geo.F, torch.float32, "cpu")
    P.launch_proj_grad(dy, w, branches, alpha, geo, list(grads), part)
    da = dy.double() @ w.double()
    for k in range(K):
        assert _outside_untouched(bufs[k])
        assert_close(grads[k], da * alpha[:, None, None, None, :, k].double(), torch.float32, name=f"grad {k}")
    dalpha = K_.batch_sums(part, geo, shape[0], blocks).view(shape[0], K, -1).transpose(1, 2)
    want = torch.stack([(da * t.double()).sum(dim=(1, 2, 3)) for t in branches], dim=2)
    assert_close(dalpha, want, torch.float32, name="dalpha")


@pytest.mark.parametrize("shape, items", [((3, 2, 4, 4, 20), 1), ((3, 1, 4, 5, 20), 2), ((5, 1, 3, 3, 20), 0)])
def test_proj_alpha_reads(shape, items, monkeypatch):
    """alpha is read as one vector per batch item when no 16-row tile spans more than one
    (rows per item 32) or two (20, the last tile running past M) items, and per element
    otherwise (9): each path, in the forward, the dA epilogue and the dW load stage, gives the
    float64 reference's output and gradients."""
    skip_unless_runs("_reweighted_proj", "triton", "cpu")
    from mixops.kernels import morph_fc as K_
    from mixops.kernels import morph_fc_proj as P

    tiles = K_.Blocks(m=16, n=16, k=16, num_warps=4, num_stages=1)
    for module in (K_, P):
        monkeypatch.setattr(module, "gemm_blocks", lambda M, F, dtype: tiles)
    monkeypatch.setattr(K_, "grad_weight_blocks", lambda M, F, dtype: tiles)
    assert K_.alpha_items(math.prod(shape[1:4]), tiles.m) == items
    _check("triton", *_inputs(shape, 3))


def test_proj_errors():
    x = torch.randn(1, 4, 6, 8)
    a = torch.rand(1, 8, 2)
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="branches must be a list of 2 or 3"):
        reweighted_proj([x], a[..., :1], w, None)
    with pytest.raises(ValueError, match=r"branches\[1\] must have the shape"):
        reweighted_proj([x, x[:, :2]], a, w, None)
    with pytest.raises(ValueError, match=r"alpha must have shape \(1, 8, 3\)"):
        reweighted_proj([x, x, x], a, w, None)
    with pytest.raises(TypeError, match="alpha must be torch.float32"):
        reweighted_proj([x, x], a.half(), w, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(8, 8\)"):
        reweighted_proj([x, x], a, torch.randn(8, 6), None)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        reweighted_proj([x, x], a, w, torch.randn(6))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,K", [((4, 1, 56, 56, 112), 3), ((3, 1, 14, 14, 392), 3), ((5, 1, 7, 7, 784), 2), ((2, 8, 7, 7, 784), 2)]
)
def test_gpu_proj_matches_float64(shape, K, dtype, gpu_backend):
    if gpu_backend not in available_backends("_reweighted_proj"):
        pytest.skip(f"no {gpu_backend} backend here")
    _check(gpu_backend, *_inputs(shape, K, dtype, "cuda"), dtype)
