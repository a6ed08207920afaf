"""``mixops::_dynamixer_reweighted``, pass 2 of the fused DynaMixerBlock path: the reweighted sum
``h*a0 + w*a1 + c*a2`` of the three channel-FC branches (``mix_h.out``, ``mix_w.out``,
``mlp_c``) before ``proj``, on every backend registered for it, against the float64 reference:
forward and every gradient (maps, weights, biases, alpha) with and without each bias, strided
maps, gradcheck, opcheck, the argument errors, and (Triton) an output written exactly where it
belongs."""
from __future__ import annotations

import pytest
import torch

from mixops.ops.dynamixer import dynamixer_reweighted
from mixops.reference import dynamixer as ref
from mixops_testing import assert_close, cpu_and_cuda, skip_unless_runs

OP = "_dynamixer_reweighted"
f64 = torch.float64
NAMES = ("mixed_h", "mixed_w", "x", "weight_h", "weight_w", "weight_c", "bias_h", "bias_w", "bias_c", "alpha")


def make_inputs(shape, dtype=f64, device="cpu", biases=(True, True, False)):
    """Three maps of ``shape`` [B, H, W, C], weights ``[C, C]``, the biases asked for, and
    alpha ``[B, C, 3]`` (a softmax over the branches) in the accumulate dtype."""
    B, C = shape[0], shape[-1]
    maps = [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]
    weights = [torch.randn(C, C, dtype=dtype, device=device) / C**0.5 for _ in range(3)]
    bias = [torch.randn(C, dtype=dtype, device=device) if has else None for has in biases]
    acc = torch.promote_types(dtype, torch.float32)
    alpha = torch.randn(B, C, 3, dtype=acc, device=device).softmax(dim=2)
    return [*maps, *weights, *bias, alpha]


def call(inputs, **kw):
    return dynamixer_reweighted(*inputs[:3], tuple(inputs[3:6]), tuple(inputs[6:9]), inputs[9], **kw)


def _check(inputs, backend, dtype):
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    present = [t for t in leaves if t is not None]
    out = call(leaves, backend=backend)
    assert out.dtype == leaves[0].dtype and out.shape == leaves[0].shape and out.is_contiguous()
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    got = torch.autograd.grad(out, present, g)
    exact = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in inputs]
    want = ref.dynamixer_reweighted(*exact)
    assert_close(out, want, dtype=dtype, name="output")
    names = [n for n, t in zip(NAMES, inputs) if t is not None]
    for name, a, e in zip(names, got, torch.autograd.grad(want, [t for t in exact if t is not None], g.cpu().double())):
        assert a.dtype == (inputs[9].dtype if name == "alpha" else dtype)
        assert_close(a, e, dtype=dtype, name=f"grad {name}")


@pytest.mark.op(OP)
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("biases", [(True, True, False), (True, True, True), (False, False, False)])
@pytest.mark.parametrize("shape", [(2, 3, 5, 12), (1, 7, 2, 40)])
def test_forward_and_gradients_match_reference(shape, biases, dtype, device, backend):
    """(2, 3, 5, 12): C <= H*W (dW / dalpha from the per-sample product); (1, 7, 2, 40): C > H*W
    (from the recomputed branch outputs); DynaMixer's mlp_c has a bias only with qkv_bias."""
    skip_unless_runs(OP, backend, device)
    _check(make_inputs(shape, dtype, device, biases), backend, dtype)


@pytest.mark.op(OP)
def test_strided_maps(backend):
    """The maps as a transposed view (the H-mixed map's layout before the op's copy), an NCHW
    channels-last view and a channel slice; a transposed weight."""
    skip_unless_runs(OP, backend, "cpu")
    shape = (2, 4, 3, 8)
    inputs = make_inputs(shape)
    mh, mw, x = inputs[:3]
    strided = [
        mh.transpose(1, 2).contiguous().transpose(1, 2),
        mw.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
        torch.cat([x, x[..., :3]], dim=-1)[..., :8],
    ]
    assert not any(t.is_contiguous() for t in strided)
    views = [*strided, inputs[3].t().contiguous().t(), *inputs[4:]]
    assert_close(call(views, backend=backend), ref.dynamixer_reweighted(*inputs))
    _check(views, backend, f64)


@pytest.mark.op(OP)
def test_gradcheck(backend):
    skip_unless_runs(OP, backend, "cpu")
    inputs = [t.requires_grad_() for t in make_inputs((1, 2, 3, 4), biases=(True, True, True))]
    assert torch.autograd.gradcheck(lambda *t: call(t, backend=backend), inputs, fast_mode=True)


@pytest.mark.op(OP)
def test_opcheck(backend):
    skip_unless_runs(OP, backend, "cpu")
    inputs = [t.requires_grad_() if t is not None else None for t in make_inputs((1, 2, 3, 4))]
    torch.library.opcheck(dynamixer_reweighted.op, (*inputs, backend))


def test_triton_writes_exactly_its_output():
    skip_unless_runs(OP, "triton", "cpu")
    from mixops.kernels import _reweighted_mix as RM

    shape = (2, 3, 5, 12)
    inputs = make_inputs(shape)
    buf = torch.full((3, 5, 7, 17), float("nan"), dtype=f64)
    inside = torch.zeros(buf.shape, dtype=torch.bool)
    index = (slice(1, None), slice(1, 4), slice(1, 6), slice(2, 14))
    inside[index] = True
    out = buf[index]
    RM.launch_mix(tuple(inputs[:3]), None, tuple(inputs[3:6]), tuple(inputs[6:9]), inputs[9], out)
    assert buf[~inside].isnan().all(), "wrote outside out"
    assert_close(out, ref.dynamixer_reweighted(*inputs))


def _replace(inputs, i, t):
    out = list(inputs)
    out[i] = t
    return out


@pytest.mark.parametrize(
    "i, bad, error, match",
    [
        (1, torch.randn(2, 3, 4, 12, dtype=f64), ValueError, "mixed_w"),
        (2, torch.randn(2, 3, 5, 12), TypeError, "x"),
        (0, torch.randn(3, 5, 12, dtype=f64), ValueError, "mixed_h"),
        (4, torch.randn(12, 8, dtype=f64), ValueError, "weight_w"),
        (8, torch.randn(11, dtype=f64), ValueError, "bias_c"),
        (9, torch.rand(2, 12, 3), TypeError, "alpha"),
        (9, torch.rand(2, 12, 2, dtype=f64), ValueError, "alpha"),
    ],
)
def test_errors_name_the_argument(i, bad, error, match):
    inputs = make_inputs((2, 3, 5, 12))
    with pytest.raises(error, match=match):
        call(_replace(inputs, i, bad))
