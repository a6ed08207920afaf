"""mixops.partition_fc / mixops.locality_injection: vs the reference, autograd, opcheck, errors.

Every test that runs an op takes a ``backend`` argument: it runs once per backend registered
for the op of its ``op`` mark (tests/conftest.py), always against the float64 reference.
"""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.ops import repmlp as ops
from mixops.reference import repmlp as ref
from mixops_testing import assert_close, cpu_and_cuda, only_backends, skip_unless_runs

F64 = torch.float64
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# (N, C, S, h, w, H, W): native resolution, S = 1 scrambled, S > 1 scrambled, non-square
CASES = [
    (2, 8, 2, 4, 4, 4, 4),
    (2, 4, 1, 3, 3, 6, 6),
    (1, 8, 2, 4, 3, 8, 6),
    (3, 6, 3, 5, 4, 5, 8),
]


def _inputs(N, C, S, h, w, H, W, dtype=F64, device="cpu", bias=True):
    hw = h * w
    x = torch.randn(N, C, H, W, dtype=F64)
    weight = torch.randn(S * hw, hw, 1, 1, dtype=F64) / hw**0.5
    b = torch.randn(S * hw, dtype=F64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return (x, weight, b), (cast(x), cast(weight), cast(b))


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_partition_fc_matches_reference(case, dtype, device, backend):
    """Forward and the gradients of x, weight and bias against the float64 reference."""
    skip_unless_runs("partition_fc", backend, device)
    N, C, S, h, w, H, W = case
    (x64, w64, b64), (x, weight, b) = _inputs(*case, dtype=dtype, device=device)
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64)]
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    out = mixops.partition_fc(x, weight, b, partition=(h, w), num_sharesets=S, backend=backend)
    assert out.dtype == dtype and out.device.type == device
    expected = ref.partition_fc(x64, w64, b64, None, (h, w), S)
    assert_close(out, expected, dtype)

    # an output gradient exactly representable in dtype: the reference sees the same one
    grad = torch.randn_like(expected).to(dtype).to(F64)
    got = torch.autograd.grad(out, leaves, grad.to(dtype=dtype, device=device))
    want = torch.autograd.grad(expected, leaves64, grad)
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        assert g.dtype == dtype and g.device.type == device, name
        assert_close(g, r, dtype, name=f"grad {name}")


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_partition_fc_gated_matches_reference(case, dtype, device, backend):
    """The global-perceptron gate as the op's epilogue ([N, C, 1, 1] as the module passes it,
    indexed by the output channel also where the map is scrambled): forward and the gradients of
    x, weight, bias and gate against the float64 reference."""
    skip_unless_runs("partition_fc", backend, device)
    N, C, S, h, w, H, W = case
    (x64, w64, b64), (x, weight, b) = _inputs(*case, dtype=dtype, device=device)
    gate64 = torch.rand(N, C, 1, 1, dtype=F64) + 0.5
    gate = gate64.to(dtype=dtype, device=device)
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64, gate64)]
    leaves = [t.requires_grad_() for t in (x, weight, b, gate)]
    out = mixops.partition_fc(x, weight, b, partition=(h, w), num_sharesets=S, gate=gate, backend=backend)
    expected = ref.partition_fc(x64, w64, b64, gate64[:, :, 0, 0], (h, w), S)
    assert_close(out, expected, dtype)
    grad = torch.randn_like(expected).to(dtype).to(F64)
    got = torch.autograd.grad(out, leaves, grad.to(dtype=dtype, device=device))
    want = torch.autograd.grad(expected, leaves64, grad)
    for name, g, r in zip(("x", "weight", "bias", "gate"), got, want):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close(g, r, dtype, name=f"grad {name}")


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("case", CASES[:3])
def test_partition_fc_awkward_layouts(case, backend):
    """Channels-last, sliced and transposed inputs, and a non-contiguous output gradient."""
    skip_unless_runs("partition_fc", backend, "cpu")
    N, C, S, h, w, H, W = case
    (x, weight, b), _ = _inputs(*case)
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    expected = ref.partition_fc(x, weight, b, None, (h, w), S)
    # an output gradient that is a transposed view, and its reference gradients
    grad = torch.randn(N, C, W, H, dtype=F64).transpose(2, 3)
    assert not grad.is_contiguous()
    want = torch.autograd.grad(expected, leaves, grad)
    channels_last = x.detach().to(memory_format=torch.channels_last)
    sliced = torch.randn(N, C, H, W + 3, dtype=F64)[..., 1:1 + W]
    sliced.copy_(x.detach())
    # the 2-D weight form, as a non-contiguous (transposed) view
    weight_2d = weight.detach()[:, :, 0, 0].t().contiguous().t()
    assert not weight_2d.is_contiguous()
    layouts = (
        ("channels_last x", channels_last, weight.detach().clone()),
        ("sliced x", sliced, weight.detach().clone()),
        ("transposed 2-D weight", x.detach().clone(), weight_2d),
    )
    for label, xv, wv in layouts:
        bv = b.detach().clone()
        for t in (xv, wv, bv):
            t.requires_grad_()
        out = mixops.partition_fc(xv, wv, bv, partition=[h, w], num_sharesets=S, backend=backend)
        assert_close(out, expected, name=f"{label}: output")
        got = torch.autograd.grad(out, [xv, wv, bv], grad)
        for name, g, r in zip(("x", "weight", "bias"), got, want):
            assert_close(g, r.reshape(g.shape), name=f"{label}: grad {name}")


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", [(1, 4, 2, 2, 3, 4, 3), (1, 2, 1, 2, 2, 4, 4)])
def test_partition_fc_gradcheck(case, bias, backend):
    skip_unless_runs("partition_fc", backend, "cpu")
    N, C, S, h, w, H, W = case
    (x, weight, b), _ = _inputs(*case, bias=bias)
    args = [t.requires_grad_() for t in (x, weight, b) if t is not None]

    def f(*ts):
        bb = ts[2] if bias else None
        return mixops.partition_fc(ts[0], ts[1], bb, partition=(h, w), num_sharesets=S, backend=backend)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed_weight"])
@pytest.mark.parametrize("H,W", [(2, 3), (4, 6)])
def test_partition_fc_opcheck(bias, layout, H, W, backend):
    skip_unless_runs("partition_fc", backend, "cpu")
    (x, weight, b), _ = _inputs(1, 4, 2, 2, 3, H, W, bias=bias)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if layout == "transposed_weight":
        weight = weight[:, :, 0, 0].t().contiguous().t()[:, :, None, None]
    for t in (x, weight, b):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(ops._partition_fc.op, (x, weight, b, None, [2, 3], 2, backend))


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("case", [(1, 4, 2, 2, 3, 4, 3), (2, 2, 1, 2, 2, 4, 4)])
def test_partition_fc_gated_gradcheck(case, backend):
    skip_unless_runs("partition_fc", backend, "cpu")
    N, C, S, h, w, H, W = case
    (x, weight, b), _ = _inputs(*case)
    gate = torch.rand(N, C, dtype=F64)
    args = [t.requires_grad_() for t in (x, weight, b, gate)]

    def f(*ts):
        return mixops.partition_fc(ts[0], ts[1], ts[2], partition=(h, w), num_sharesets=S, gate=ts[3], backend=backend)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("H,W", [(2, 3), (4, 6)])
def test_partition_fc_gated_opcheck(bias, H, W, backend):
    skip_unless_runs("partition_fc", backend, "cpu")
    (x, weight, b), _ = _inputs(2, 4, 2, 2, 3, H, W, bias=bias)
    gate = torch.rand(2, 4, dtype=F64)
    for t in (x, weight, b, gate):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(ops._partition_fc.op, (x, weight, b, gate, [2, 3], 2, backend))


def _li_inputs(S=2, K=3, h=3, w=4, dtype=F64, fc_bias=True, kernel_bias=True):
    hw = h * w
    return (
        torch.randn(S * hw, hw, 1, 1, dtype=dtype),
        torch.randn(S * hw, dtype=dtype) if fc_bias else None,
        torch.randn(S, 1, K, K, dtype=dtype),
        torch.randn(S, dtype=dtype) if kernel_bias else None,
    )


@pytest.mark.op("locality_injection")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,K,h,w", [(2, 3, 3, 4), (1, 5, 4, 4), (4, 1, 2, 3), (2, 5, 3, 2)])
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_locality_injection_matches_reference(dtype, S, K, h, w, device, backend):
    """Forward and the gradients of all four tensors against the float64 reference; the last
    shape has a kernel wider than the partition (taps that fall outside every map)."""
    skip_unless_runs("locality_injection", backend, device)
    inputs64 = [t.requires_grad_() for t in _li_inputs(S, K, h, w)]
    inputs = [t.detach().to(dtype=dtype, device=device).requires_grad_() for t in inputs64]
    weight, bias = mixops.locality_injection(*inputs, partition=(h, w), backend=backend)
    ref_w, ref_b = ref.locality_injection(*inputs64, (h, w))
    assert weight.dtype == dtype and weight.shape == inputs[0].shape and weight.device.type == device
    assert bias.dtype == dtype and bias.device.type == device
    assert_close(weight, ref_w, dtype, name="weight")
    assert_close(bias, ref_b, dtype, name="bias")

    # output gradients exactly representable in dtype: the reference sees the same ones
    gw, gb = (torch.randn_like(t).to(dtype).to(F64) for t in (ref_w, ref_b))
    cast = [g.to(dtype=dtype, device=device) for g in (gw, gb)]
    got = torch.autograd.grad((weight, bias), inputs, cast)
    want = torch.autograd.grad((ref_w, ref_b), inputs64, (gw, gb))
    for name, g, r in zip(("fc_weight", "fc_bias", "kernel", "kernel_bias"), got, want):
        assert g.dtype == dtype and g.device.type == device, name
        assert_close(g, r, dtype, name=f"grad {name}")


@pytest.mark.op("locality_injection")
def test_locality_injection_2d_fc_weight_and_missing_biases(backend):
    skip_unless_runs("locality_injection", backend, "cpu")
    fc_weight, _, kernel, _ = _li_inputs()
    weight, bias = mixops.locality_injection(
        fc_weight[:, :, 0, 0], None, kernel, None, partition=(3, 4), backend=backend
    )
    ref_w, ref_b = ref.locality_injection(fc_weight, None, kernel, None, (3, 4))
    assert weight.shape == (24, 12)
    assert_close(weight, ref_w[:, :, 0, 0])
    assert_close(bias, torch.zeros(24, dtype=F64))
    assert_close(ref_b, torch.zeros(24, dtype=F64))


@pytest.mark.op("locality_injection")
@pytest.mark.parametrize("fc_bias,kernel_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_locality_injection_gradcheck(fc_bias, kernel_bias, backend):
    skip_unless_runs("locality_injection", backend, "cpu")
    inputs = _li_inputs(2, 3, 2, 3, fc_bias=fc_bias, kernel_bias=kernel_bias)
    present = [i for i, t in enumerate(inputs) if t is not None]
    args = [inputs[i].requires_grad_() for i in present]

    def f(*ts):
        full = list(inputs)
        for i, t in zip(present, ts):
            full[i] = t
        return mixops.locality_injection(*full, partition=(2, 3), backend=backend)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.op("locality_injection")
@pytest.mark.parametrize("biases", [True, False])
def test_locality_injection_opcheck(biases, backend):
    skip_unless_runs("locality_injection", backend, "cpu")
    inputs = _li_inputs(2, 3, 2, 3, fc_bias=biases, kernel_bias=biases)
    for t in inputs:
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(ops._locality_injection.op, (*inputs, [2, 3], backend))


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_partition_fc_is_deterministic(device, backend):
    """Two runs give bit-identical outputs and gradients (no order-dependent accumulation)."""
    skip_unless_runs("partition_fc", backend, device)
    # many rows per share-set: the weight / bias gradients are long reductions
    (_, _, _), (x, weight, b) = _inputs(4, 16, 2, 3, 5, 12, 10, dtype=torch.float32, device=device)
    gate = torch.rand(4, 16, dtype=torch.float32).to(device)
    leaves = [t.requires_grad_() for t in (x, weight, b, gate)]
    grad = torch.randn(x.shape, dtype=torch.float32).to(device)
    runs = []
    for _ in range(2):
        out = mixops.partition_fc(x, weight, b, partition=(3, 5), num_sharesets=2, gate=gate, backend=backend)
        runs.append((out, *torch.autograd.grad(out, leaves, grad)))
    for name, a, c in zip(("output", "grad x", "grad weight", "grad bias", "grad gate"), *runs):
        assert torch.equal(a, c), f"{name} differs between two runs"


@pytest.mark.op("locality_injection")
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_locality_injection_is_deterministic(device, backend):
    """Two runs give bit-identical outputs and gradients (the kernel gradient sums over taps)."""
    skip_unless_runs("locality_injection", backend, device)
    inputs = [t.to(dtype=torch.float32, device=device).requires_grad_() for t in _li_inputs(4, 5, 7, 6)]
    grads = [torch.randn(t.shape, dtype=torch.float32).to(device) for t in (inputs[0], inputs[1])]
    runs = []
    for _ in range(2):
        outs = mixops.locality_injection(*inputs, partition=(7, 6), backend=backend)
        runs.append((*outs, *torch.autograd.grad(outs, inputs, grads)))
    names = ("weight", "bias", "grad fc_weight", "grad fc_bias", "grad kernel", "grad kernel_bias")
    for name, a, c in zip(names, *runs):
        assert torch.equal(a, c), f"{name} differs between two runs"


def test_backend_plumbing(monkeypatch):
    (x, weight, b), _ = _inputs(*CASES[0])
    calls = {
        "partition_fc": lambda name: mixops.partition_fc(
            x, weight, b, partition=(4, 4), num_sharesets=2, backend=name
        ),
        "locality_injection": lambda name: mixops.locality_injection(
            *_li_inputs(), partition=(3, 4), backend=name
        ),
    }
    # with the real registry: a backend the op lacks is an error that lists the ones it has
    for op, call in calls.items():
        have = mixops.available_backends(op)
        assert "torch" in have
        for missing in (b for b in mixops.backend.BACKENDS if b not in have):
            listed = f"not available for mixops.{op}; available: {', '.join(have)}$"
            with pytest.raises(ValueError, match=listed):
                call(missing)
    # pretend no kernel is registered, so that "triton" is a backend the ops lack
    for op, call in calls.items():
        only_backends(monkeypatch, op, "torch")
        assert mixops.available_backends(op) == ("torch",)
        only_torch = f"backend 'triton' is not available for mixops.{op}; available: torch$"
        with pytest.raises(ValueError, match=only_torch):
            call("triton")
        with pytest.raises(ValueError, match="backend must be one of"):
            call("nope")
    with mixops.use_backend("torch"):
        out = mixops.partition_fc(x, weight, b, partition=(4, 4), num_sharesets=2)
    assert_close(out, ref.partition_fc(x, weight, b, None, (4, 4), 2))


def _pfc_call(x=None, weight=None, bias="default", partition=(4, 4), S=2, gate=None):
    (x0, w0, b0), _ = _inputs(2, 8, 2, 4, 4, 8, 8)
    return lambda: mixops.partition_fc(
        x0 if x is None else x,
        w0 if weight is None else weight,
        b0 if isinstance(bias, str) else bias,
        partition=partition,
        num_sharesets=S,
        gate=gate,
    )


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=torch.randn(2, 8, 8, 7, dtype=F64)), ValueError, "width"),
        (dict(x=torch.randn(2, 8, 6, 8, dtype=F64)), ValueError, "height"),
        (dict(x=torch.randn(2, 7, 8, 8, dtype=F64)), ValueError, "num_sharesets"),
        (dict(x=torch.randn(8, 8, 8, dtype=F64)), ValueError, "x"),
        (dict(x=torch.randn(2, 8, 8, 8, dtype=torch.float32)), TypeError, "weight"),
        (dict(x=torch.zeros(2, 8, 8, 8, dtype=torch.int64)), TypeError, "x"),
        (dict(weight=torch.randn(32, 16, 1, 1, dtype=F64), S=1), ValueError, "weight"),
        (dict(weight=torch.randn(32, 16, 3, 1, dtype=F64)), ValueError, "weight"),
        (dict(weight=torch.randn(32, 15, dtype=F64)), ValueError, "weight"),
        (dict(weight=torch.randn(32, 16, 1, 1, dtype=F64, device="meta")), ValueError, "weight"),
        (dict(bias=torch.randn(16, dtype=F64)), ValueError, "bias"),
        (dict(bias=torch.randn(32, dtype=torch.float32)), TypeError, "bias"),
        (dict(partition=4), TypeError, "partition"),
        (dict(partition=(4, 4, 1)), TypeError, "partition"),
        (dict(partition=(0, 4)), ValueError, "partition"),
        (dict(partition=(4, 4.0)), TypeError, "partition"),
        (dict(S=0), ValueError, "num_sharesets"),
        (dict(S=True), TypeError, "num_sharesets"),
        (dict(gate=torch.rand(2, 8, 1, dtype=F64)), ValueError, "gate"),
        (dict(gate=torch.rand(1, 8, 1, 1, dtype=F64)), ValueError, "gate"),
        (dict(gate=torch.rand(2, 4, dtype=F64)), ValueError, "gate"),
        (dict(gate=torch.rand(2, 8, dtype=torch.float32)), TypeError, "gate"),
        (dict(gate=[[1.0] * 8] * 2), TypeError, "gate"),
    ],
)
def test_partition_fc_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _pfc_call(**kwargs)()


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(kernel=torch.randn(2, 1, 2, 2, dtype=F64)), ValueError, "kernel"),
        (dict(kernel=torch.randn(2, 2, 3, 3, dtype=F64)), ValueError, "kernel"),
        (dict(kernel=torch.randn(2, 1, 3, 5, dtype=F64)), ValueError, "kernel"),
        (dict(kernel=torch.randn(2, 3, 3, dtype=F64)), ValueError, "kernel"),
        (dict(kernel=torch.randn(3, 1, 3, 3, dtype=F64)), ValueError, "fc_weight"),
        (dict(fc_weight=torch.randn(24, 12, 1, 1, dtype=torch.float32)), TypeError, "fc_weight"),
        (dict(fc_weight=torch.randn(24, 11, 1, 1, dtype=F64)), ValueError, "fc_weight"),
        (dict(fc_bias=torch.randn(12, dtype=F64)), ValueError, "fc_bias"),
        (dict(kernel_bias=torch.randn(3, dtype=F64)), ValueError, "kernel_bias"),
        (dict(kernel_bias=torch.randn(2, dtype=torch.float32)), TypeError, "kernel_bias"),
        (dict(partition=(3,)), TypeError, "partition"),
    ],
)
def test_locality_injection_errors(change, exc, match):
    names = ("fc_weight", "fc_bias", "kernel", "kernel_bias")
    args = dict(zip(names, _li_inputs()))
    partition = change.pop("partition", (3, 4))
    args.update(change)
    with pytest.raises(exc, match=match):
        mixops.locality_injection(*(args[n] for n in names), partition=partition)
