"""``mixops::_dynamixer_axis_mix``, the mixing of the fused DynaMixerBlock path: the rows
(axis "w") or the columns (axis "h") of a channels-last ``[B, H, W, C]`` map, on every backend
registered for it, against the float64 reference (``dynamixer_mix`` of the official
transposed-and-reshaped sequences); H != W (each axis mixes its own length), strided maps,
two q-blocks (N = 17), S = 1, d = 1 and 4, C/S not a power of two; gradcheck, opcheck and the
argument errors."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.ops.dynamixer import dynamixer_axis_mix
from mixops.reference import dynamixer as ref
from mixops_testing import assert_close, cpu_and_cuda, skip_unless_runs
from test_dynamixer_op import ARG_NAMES, make_inputs

OP = "_dynamixer_axis_mix"
f64 = torch.float64

# (B, H, W, C, S, d)
SHAPES = [(2, 5, 7, 15, 5, 3), (1, 17, 3, 24, 3, 4), (3, 4, 2, 8, 1, 1)]


def map_inputs(shape, axis, dtype=f64, device="cpu"):
    """x [B, H, W, C] and the parameters for the mixed axis' length N."""
    B, H, W, C, S, d = shape
    _, *params = make_inputs(1, H if axis == "h" else W, C, S, d, dtype=dtype, device=device)
    return [torch.randn(B, H, W, C, dtype=dtype, device=device), *params]


def call(inputs, shape, axis, **kw):
    *_, s, d = shape
    return dynamixer_axis_mix(*inputs, num_head=s, reduced_dim=d, axis=axis, **kw)


def f64_reference(inputs, shape, axis):
    *_, s, d = shape
    return ref.dynamixer_axis_mix(*(t.detach().cpu().double() for t in inputs), s, d, axis)


def test_reference_is_the_official_sequence_order():
    """Column b*W + w of the H axis and row b*H + h of the W axis are the sequences the
    official block hands mix_h and mix_w."""
    shape = (2, 3, 4, 6, 2, 2)
    x, *params = map_inputs(shape, "h")
    cols = ref.dynamixer_mix(x.permute(0, 2, 1, 3).reshape(8, 3, 6), *params, 2, 2)
    assert torch.equal(ref.dynamixer_axis_mix(x, *params, 2, 2, "h"), cols.reshape(2, 4, 3, 6).permute(0, 2, 1, 3))
    x, *params = map_inputs(shape, "w")
    rows = ref.dynamixer_mix(x.reshape(6, 4, 6), *params, 2, 2)
    assert torch.equal(ref.dynamixer_axis_mix(x, *params, 2, 2, "w"), rows.reshape(2, 3, 4, 6))


@pytest.mark.op(OP)
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", ["h", "w"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_reference(shape, axis, dtype, device, backend):
    skip_unless_runs(OP, backend, device)
    inputs = [t.requires_grad_() for t in map_inputs(shape, axis, dtype, device)]
    out = call(inputs, shape, axis, backend=backend)
    assert out.shape == inputs[0].shape and out.dtype == dtype and out.is_contiguous()
    grad_out = torch.randn(out.shape, dtype=dtype, device=device)
    got = torch.autograd.grad(out, inputs, grad_out)
    exact = [t.detach().cpu().double().requires_grad_() for t in inputs]
    want = ref.dynamixer_axis_mix(*exact, *shape[-2:], axis)
    assert_close(out, want, dtype=dtype, name="output")
    for name, g, w in zip(ARG_NAMES, got, torch.autograd.grad(want, exact, grad_out.cpu().double())):
        assert g.dtype == dtype
        assert_close(g, w, dtype=dtype, name=f"grad {name}")


@pytest.mark.op(OP)
@pytest.mark.parametrize("axis", ["h", "w"])
def test_strided_maps(axis, backend):
    """x as the channels-last view of an NCHW tensor (after a conv) and as a channel slice of a
    wider map, with a transposed generate weight."""
    skip_unless_runs(OP, backend, "cpu")
    shape = (2, 5, 7, 15, 5, 3)
    B, H, W, C, *_ = shape
    x, cw, cb, gw, gb = map_inputs(shape, axis)
    nchw = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    wide = torch.cat([x, torch.randn(B, H, W, 3, dtype=f64)], dim=-1)[..., :C]
    gw_t = gw.t().contiguous().t()
    assert not (nchw.is_contiguous() or wide.is_contiguous() or gw_t.is_contiguous())
    want = f64_reference((x, cw, cb, gw, gb), shape, axis)
    for name, view in (("NCHW view", nchw), ("channel slice", wide)):
        inputs = [view.requires_grad_(), cw, cb, gw_t, gb]
        out = call(inputs, shape, axis, backend=backend)
        assert_close(out, want, name=name)
        dy = torch.randn(out.shape, dtype=f64)
        (dx,) = torch.autograd.grad(out, inputs[0], dy)
        x64 = x.clone().requires_grad_()
        (want_dx,) = torch.autograd.grad(ref.dynamixer_axis_mix(x64, cw, cb, gw, gb, 5, 3, axis), x64, dy)
        assert_close(dx, want_dx, name=f"{name} grad x")


@pytest.mark.op(OP)
@pytest.mark.parametrize("axis", ["h", "w"])
def test_gradcheck(axis, backend):
    skip_unless_runs(OP, backend, "cpu")
    shape = (1, 3, 4, 4, 2, 2)
    inputs = [t.requires_grad_() for t in map_inputs(shape, axis)]
    assert torch.autograd.gradcheck(lambda *t: call(t, shape, axis, backend=backend), inputs, fast_mode=True)


@pytest.mark.op(OP)
def test_opcheck(backend):
    skip_unless_runs(OP, backend, "cpu")
    shape = (1, 3, 4, 6, 3, 2)
    inputs = [t.requires_grad_() for t in map_inputs(shape, "h")]
    torch.library.opcheck(dynamixer_axis_mix.op, (*inputs, 3, 2, "h", backend))


def test_errors_name_the_argument():
    shape = (1, 3, 4, 6, 3, 2)
    inputs = map_inputs(shape, "h")
    with pytest.raises(ValueError, match="axis"):
        call(inputs, shape, "c")
    with pytest.raises(ValueError, match="generate_weight"):
        call(inputs, shape, "w")  # generate sized for H = 3, the W axis has 4 tokens
    with pytest.raises(ValueError, match="x"):
        call([inputs[0][0], *inputs[1:]], shape, "h")
    with pytest.raises(ValueError, match="num_head"):
        dynamixer_axis_mix(*inputs, num_head=4, reduced_dim=2, axis="h")
    with pytest.raises(TypeError, match="compress_bias"):
        call([*inputs[:2], inputs[2].float(), *inputs[3:]], shape, "h")


def test_torch_backend_is_the_reference():
    shape = SHAPES[0]
    inputs = map_inputs(shape, "h")
    with mixops.use_backend("torch"):
        assert torch.equal(call(inputs, shape, "h"), f64_reference(inputs, shape, "h"))
