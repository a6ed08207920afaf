"""``mixops.dynamixer_mix`` against the float64 reference: dtypes, views, gradcheck, opcheck,
backend plumbing and the documented error paths.

Every test that checks numbers takes a ``backend`` argument: it runs once per backend registered
for ``dynamixer_mix`` (tests/conftest.py), always against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.reference import dynamixer as ref
from mixops_testing import assert_close, cpu_and_cuda, only_backends, skip_unless_runs

OP = "dynamixer_mix"
# (B', N, C, S, d): stage-like shapes, d > C/S, one segment, N not a power of two
SHAPES = [(3, 5, 6, 3, 2), (2, 7, 12, 4, 3), (1, 4, 8, 1, 1), (4, 16, 48, 16, 2), (2, 6, 10, 5, 8)]
ARG_NAMES = ("x", "compress_weight", "compress_bias", "generate_weight", "generate_bias")


def make_inputs(bp, n, c, s, d, dtype=torch.float64, device="cpu"):
    x = torch.randn(bp, n, c, dtype=dtype, device=device)
    cw = torch.randn(s * d, c, dtype=dtype, device=device) / c**0.5
    cb = torch.randn(s * d, dtype=dtype, device=device) * 0.1
    gw = torch.randn(n * n, n * d, dtype=dtype, device=device) * 2 / (n * d) ** 0.5
    gb = torch.randn(n * n, dtype=dtype, device=device) * 0.1
    return x, cw, cb, gw, gb


def call(inputs, s, d, **kw):
    return mixops.dynamixer_mix(*inputs, num_head=s, reduced_dim=d, **kw)


def f64_reference(inputs, s, d):
    return ref.dynamixer_mix(*(t.detach().cpu().double() for t in inputs), s, d)


@pytest.mark.op(OP)
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_op_matches_reference(shape, dtype, device, backend):
    skip_unless_runs(OP, backend, device)
    *_, s, d = shape
    inputs = make_inputs(*shape, dtype=dtype, device=device)
    out = call(inputs, s, d, backend=backend)
    assert out.dtype == dtype and out.device == inputs[0].device
    assert_close(out, f64_reference(inputs, s, d), dtype=dtype)


@pytest.mark.op(OP)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_non_contiguous_views(dtype, backend):
    skip_unless_runs(OP, backend, "cpu")
    bp, n, c, s, d = 3, 5, 12, 4, 2
    x, cw, cb, gw, gb = make_inputs(bp, n, c, s, d, dtype=dtype)
    # x as a transpose of [N, B', C] and as a channel slice of a wider tensor
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    x_wide = torch.cat([x, torch.randn(bp, n, 5, dtype=dtype)], dim=-1)[..., :c]
    gw_t = gw.t().contiguous().t()
    cb_strided = torch.stack([cb, cb], dim=-1)[:, 0]
    assert not (x_t.is_contiguous() or x_wide.is_contiguous() or gw_t.is_contiguous() or cb_strided.is_contiguous())
    want = f64_reference((x, cw, cb, gw, gb), s, d)
    assert_close(call((x_t, cw, cb, gw, gb), s, d, backend=backend), want, dtype=dtype, name="transposed x")
    assert_close(call((x_wide, cw, cb_strided, gw_t, gb), s, d, backend=backend), want, dtype=dtype,
                 name="sliced views")


@pytest.mark.op(OP)
def test_op_empty_batch(backend):
    skip_unless_runs(OP, backend, "cpu")
    inputs = [t.requires_grad_() for t in make_inputs(0, 4, 8, 2, 2)]
    out = call(inputs, 2, 2, backend=backend)
    assert out.shape == (0, 4, 8)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    for name, g, t in zip(ARG_NAMES, grads, inputs):
        assert g.shape == t.shape, f"grad {name}"
        assert torch.count_nonzero(g) == 0, f"grad {name} of an empty batch is not zero"


@pytest.mark.op(OP)
@pytest.mark.parametrize("shape", [(2, 3, 4, 2, 2), (1, 4, 6, 3, 1)])
def test_op_gradcheck(shape, backend):
    skip_unless_runs(OP, backend, "cpu")
    *_, s, d = shape
    inputs = [t.requires_grad_() for t in make_inputs(*shape)]
    assert torch.autograd.gradcheck(lambda *t: call(t, s, d, backend=backend), inputs, fast_mode=True)


@pytest.mark.op(OP)
def test_op_gradients_match_reference(backend):
    skip_unless_runs(OP, backend, "cpu")
    shape = (3, 5, 6, 3, 2)
    *_, s, d = shape
    inputs = [t.requires_grad_() for t in make_inputs(*shape)]
    grad_out = torch.randn(3, 5, 6, dtype=torch.float64)
    got = torch.autograd.grad(call(inputs, s, d, backend=backend), inputs, grad_out)
    want = torch.autograd.grad(ref.dynamixer_mix(*inputs, s, d), inputs, grad_out)
    for name, g, w in zip(ARG_NAMES, got, want):
        assert_close(g, w, name=f"grad {name}")


@pytest.mark.op(OP)
def test_op_deterministic(backend):
    """Two runs give bit-identical outputs and gradients (DESIGN: deterministic backward)."""
    skip_unless_runs(OP, backend, "cpu")
    shape = (4, 16, 48, 16, 2)
    *_, s, d = shape
    inputs = [t.float().requires_grad_() for t in make_inputs(*shape)]
    grad_out = torch.randn(shape[:3])
    runs = []
    for _ in range(2):
        out = call(inputs, s, d, backend=backend)
        runs.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    for name, a, b in zip(("output", *ARG_NAMES), *runs):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.op(OP)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_op_opcheck(requires_grad, backend):
    skip_unless_runs(OP, backend, "cpu")
    shape = (2, 4, 6, 3, 2)
    *_, s, d = shape
    inputs = [t.requires_grad_(requires_grad) for t in make_inputs(*shape)]
    torch.library.opcheck(mixops.dynamixer_mix.op, (*inputs, s, d, backend))


def test_op_backend_plumbing(monkeypatch):
    only_backends(monkeypatch, OP, "torch")  # the messages name what is registered
    inputs = make_inputs(2, 4, 6, 3, 2)
    with pytest.raises(ValueError, match="available: torch"):
        call(inputs, 3, 2, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        call(inputs, 3, 2, backend="fastest")
    with mixops.use_backend("torch"):
        assert_close(call(inputs, 3, 2), f64_reference(inputs, 3, 2))


def _replace(inputs, i, t):
    out = list(inputs)
    out[i] = t
    return out


@pytest.mark.parametrize(
    "i, bad, match",
    [
        (0, torch.randn(4, 6, dtype=torch.float64), "x"),
        (1, torch.randn(6, 5, dtype=torch.float64), "compress_weight"),
        (1, torch.randn(4, 6, dtype=torch.float64), "compress_weight"),
        (1, torch.randn(6, dtype=torch.float64), "compress_weight"),
        (2, torch.randn(5, dtype=torch.float64), "compress_bias"),
        (3, torch.randn(16, 6, dtype=torch.float64), "generate_weight"),
        (3, torch.randn(12, 8, dtype=torch.float64), "generate_weight"),
        (4, torch.randn(12, dtype=torch.float64), "generate_bias"),
        (4, torch.randn(1, 16, dtype=torch.float64), "generate_bias"),
    ],
)
def test_op_shape_and_rank_errors(i, bad, match):
    inputs = make_inputs(2, 4, 6, 3, 2)  # N=4: generate [16, 8]
    with pytest.raises(ValueError, match=match):
        call(_replace(inputs, i, bad), 3, 2)


def test_op_channels_not_divisible_by_num_head():
    inputs = make_inputs(2, 4, 6, 4, 2)  # C = 6, S = 4
    with pytest.raises(ValueError, match="num_head"):
        call(inputs, 4, 2)


@pytest.mark.parametrize("i", range(1, 5))
def test_op_dtype_and_device_mismatch(i):
    inputs = make_inputs(2, 4, 6, 3, 2)
    with pytest.raises(TypeError, match=ARG_NAMES[i]):
        call(_replace(inputs, i, inputs[i].float()), 3, 2)
    with pytest.raises(ValueError, match=ARG_NAMES[i]):
        call(_replace(inputs, i, inputs[i].to("meta")), 3, 2)


def test_op_bad_scalars_and_dtypes():
    inputs = make_inputs(2, 4, 6, 3, 2)
    with pytest.raises(TypeError, match="x"):
        call(_replace(inputs, 0, torch.ones(2, 4, 6, dtype=torch.int64)), 3, 2)
    with pytest.raises(TypeError, match="num_head"):
        call(inputs, 3.0, 2)
    with pytest.raises(ValueError, match="reduced_dim"):
        call(inputs, 3, 0)
    with pytest.raises(TypeError, match="generate_weight"):
        call(_replace(inputs, 3, inputs[3].numpy()), 3, 2)
