"""mixops.nn.RepMLPBlock: official keys, == reference, train/deploy equivalence, GP gate, errors.

The tests whose numbers go through an op take a ``backend`` argument (one run per backend
registered for the op of their ``op`` mark, tests/conftest.py) and run the block inside
``mixops.use_backend(backend)``; the reference side stays ``mixops.reference`` in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixops
from mixops.nn.repmlp import GlobalPerceptron, RepMLPBlock
from mixops.reference import repmlp as ref
from mixops_testing import assert_close, only_backends, skip_unless_runs

F64 = torch.float64

# docs/repmlp.md section 2, C = 8, S = 2, h = w = 4 (hw = 16), reparam_conv_k = (1, 3), reduce 4
TRAIN_KEYS = [
    ("gp.fc1.weight", (2, 8, 1, 1)),
    ("gp.fc1.bias", (2,)),
    ("gp.fc2.weight", (8, 2, 1, 1)),
    ("gp.fc2.bias", (8,)),
    ("fc3.weight", (32, 16, 1, 1)),
    ("fc3_bn.weight", (2,)),
    ("fc3_bn.bias", (2,)),
    ("fc3_bn.running_mean", (2,)),
    ("fc3_bn.running_var", (2,)),
    ("fc3_bn.num_batches_tracked", ()),
    ("repconv1.conv.weight", (2, 1, 1, 1)),
    ("repconv1.bn.weight", (2,)),
    ("repconv1.bn.bias", (2,)),
    ("repconv1.bn.running_mean", (2,)),
    ("repconv1.bn.running_var", (2,)),
    ("repconv1.bn.num_batches_tracked", ()),
    ("repconv3.conv.weight", (2, 1, 3, 3)),
    ("repconv3.bn.weight", (2,)),
    ("repconv3.bn.bias", (2,)),
    ("repconv3.bn.running_mean", (2,)),
    ("repconv3.bn.running_var", (2,)),
    ("repconv3.bn.num_batches_tracked", ()),
]
DEPLOY_KEYS = [
    ("gp.fc1.weight", (2, 8, 1, 1)),
    ("gp.fc1.bias", (2,)),
    ("gp.fc2.weight", (8, 2, 1, 1)),
    ("gp.fc2.bias", (8,)),
    ("fc3.weight", (32, 16, 1, 1)),
    ("fc3.bias", (32,)),
]


def _skip_unless_block_runs(backend, *ops, device="cpu"):
    """Skip unless every op the test runs through the block has ``backend`` on ``device``
    (a kernel registered for one RepMLP op only must not break the other op's block tests)."""
    for op in ops:
        if backend not in mixops.available_backends(op):
            pytest.skip(f"backend {backend!r} is not registered for mixops.{op}")
        skip_unless_runs(op, backend, device)


def _keys(m):
    return [(k, tuple(t.shape)) for k, t in m.state_dict().items()]


def _randomize(m):
    """Non-trivial parameters and BN running statistics (eval-mode BN must matter)."""
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("bn.weight") or name.endswith("fc3_bn.weight"):
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0.0, 0.5)
    return m


def _block(C=8, h=4, w=4, S=2, k=(1, 3), deploy=False, dtype=F64):
    return _randomize(RepMLPBlock(C, C, h, w, reparam_conv_k=k, num_sharesets=S, deploy=deploy)).to(dtype)


def test_state_dict_keys_train_and_deploy():
    assert _keys(RepMLPBlock(8, 8, 4, 4, reparam_conv_k=(1, 3), num_sharesets=2)) == TRAIN_KEYS
    no_conv = RepMLPBlock(8, 8, 4, 4, num_sharesets=2)
    assert _keys(no_conv) == [kv for kv in TRAIN_KEYS if not kv[0].startswith("repconv")]
    deploy = RepMLPBlock(8, 8, 4, 4, reparam_conv_k=(1, 3), num_sharesets=2, deploy=True)
    assert _keys(deploy) == DEPLOY_KEYS
    assert isinstance(deploy.fc3_bn, nn.Identity)


@pytest.mark.parametrize("k", [(1, 3), None])
def test_local_inject_gives_fresh_deploy_block(k):
    m = _block(k=k).eval()
    m.local_inject()
    fresh = RepMLPBlock(8, 8, 4, 4, reparam_conv_k=k, num_sharesets=2, deploy=True)
    assert _keys(m) == _keys(fresh) == DEPLOY_KEYS
    assert list(m._modules) == list(fresh._modules) == ["gp", "fc3", "fc3_bn"]
    assert m.deploy and isinstance(m.fc3_bn, nn.Identity)
    assert m.fc3.weight.dtype == F64
    # a deploy state_dict moves into a fresh deploy block unchanged
    fresh.double().load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 8, 4, 4, dtype=F64)
    assert_close(fresh(x), m(x))


def test_local_inject_twice_raises():
    m = _block().eval()
    m.local_inject()
    with pytest.raises(RuntimeError, match="local_inject"):
        m.local_inject()
    with pytest.raises(RuntimeError, match="deploy"):
        _block(deploy=True).local_inject()


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("deploy", [False, True])
def test_load_random_official_state_dict(deploy, backend):
    _skip_unless_block_runs(backend, "partition_fc")
    keys = DEPLOY_KEYS if deploy else TRAIN_KEYS
    state = {k: (torch.randint(0, 5, s) if k.endswith("tracked") else torch.rand(s) + 0.5) for k, s in keys}
    m = RepMLPBlock(8, 8, 4, 4, reparam_conv_k=(1, 3), num_sharesets=2, deploy=deploy)
    m.load_state_dict(state, strict=True)
    for k, t in m.state_dict().items():
        assert torch.equal(t, state[k]), k
    m.eval().double()
    x = torch.randn(2, 8, 8, 4, dtype=F64)
    with mixops.use_backend(backend):
        out = m(x)
    assert_close(out, ref.repmlp_block_forward(m, x))


def _assert_grad_close(g, r, dtype, name):
    """Gradients of fp32 parameters that are sums over the whole batch (biases, BN affine)
    carry the rounding of a long cancelling reduction: 1e-4 relative in float32."""
    if dtype == torch.float32:
        err = float((g.double() - r).norm() / r.norm().clamp_min(1e-30))
        assert err < 1e-4, f"{name}: relative error {err:.3e}"
    else:
        assert_close(g, r, dtype, name=name)


# (C, S, h, w, H, W): native resolution, S = 1 scrambled, S > 1 scrambled and non-square
SHAPES = [(8, 2, 4, 4, 4, 4), (4, 1, 3, 3, 6, 6), (8, 2, 4, 5, 8, 10)]


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["train", "eval", "deploy"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_module_matches_reference(shape, mode, dtype, backend):
    _skip_unless_block_runs(backend, "partition_fc")
    C, S, h, w, H, W = shape
    m = _block(C, h, w, S, deploy=mode == "deploy", dtype=dtype)
    m.train(mode == "train")
    m64 = copy.deepcopy(m).double()
    x64 = torch.randn(3, C, H, W, dtype=F64, requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_()
    grad = torch.randn(3, C, H, W, dtype=F64)
    params = [p for p in m.parameters()]
    with mixops.use_backend(backend):
        out = m(x)
        got = torch.autograd.grad(out, [x, *params], grad.to(dtype))
    expected = ref.repmlp_block_forward(m64, x64)
    assert_close(out, expected, dtype)
    want = torch.autograd.grad(expected, [x64, *m64.parameters()], grad)
    for (name, _), g, r in zip([("x", None), *m.named_parameters()], got, want):
        if mode == "train" and name == "repconv1.conv.weight" and dtype != F64:
            # a per-channel scale that the batch-statistics BN almost removes (only eps keeps
            # it): its gradient is a near-total cancellation, so in float32 only the absolute
            # error is meaningful
            assert float((g.double() - r).abs().max()) < 1e-4
            continue
        _assert_grad_close(g, r, dtype, name=f"grad {name}")


@pytest.mark.op("partition_fc")
@pytest.mark.parametrize("shape", SHAPES)
def test_train_mode_updates_running_stats_like_official(shape, backend):
    """BN on the share-set view sees the values the official BatchNorm2d(S) on rows sees."""
    _skip_unless_block_runs(backend, "partition_fc")
    C, S, h, w, H, W = shape
    m = _block(C, h, w, S).train()
    before = copy.deepcopy(m)
    x = torch.randn(3, C, H, W, dtype=F64)
    with mixops.use_backend(backend):
        m(x)
    # the official layout: rows of S partition maps
    parts = x.reshape(-1, C, H // h, h, W // w, w).permute(0, 2, 4, 1, 3, 5)
    fc_out = F.conv2d(parts.reshape(-1, S * h * w, 1, 1), before.fc3.weight, groups=S)
    before.fc3_bn(fc_out.reshape(-1, S, h, w))
    for k in (1, 3):
        getattr(before, f"repconv{k}")(parts.reshape(-1, S, h, w))
    for name, t in before.state_dict().items():
        assert_close(m.state_dict()[name].double(), t.double(), F64, name=name)


@pytest.mark.op("locality_injection")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [(1, 3), (3, 5, 1), None])
def test_train_equals_deploy_after_local_inject(shape, k, backend):
    _skip_unless_block_runs(backend, "locality_injection", "partition_fc")
    C, S, h, w, H, W = shape
    m = _block(C, h, w, S, k=k).eval()
    x = torch.randn(2, C, H, W, dtype=F64)
    with torch.no_grad(), mixops.use_backend(backend):
        train_out = m(x)
        want_w, want_b = ref.equivalent_fc3(m)
        m.local_inject()
        deploy_out = m(x)
    assert_close(m.fc3.weight, want_w, name="fc3.weight")
    assert_close(m.fc3.bias, want_b, name="fc3.bias")
    assert_close(deploy_out, train_out)
    assert_close(ref.repmlp_block_forward(m, x), train_out)


@pytest.mark.op("partition_fc")
def test_deploy_block_independent_model(backend):
    """Deploy mode at native resolution: gv[n, c] * (W_{c%S} vec(x[n, c]) + b_{c%S})."""
    _skip_unless_block_runs(backend, "partition_fc")
    C, S, h, w = 6, 3, 3, 4
    m = _block(C, h, w, S, deploy=True)
    x = torch.randn(2, C, h, w, dtype=F64)
    hw = h * w
    mean = x.mean(dim=(2, 3))
    W1, b1 = m.gp.fc1.weight[:, :, 0, 0], m.gp.fc1.bias
    W2, b2 = m.gp.fc2.weight[:, :, 0, 0], m.gp.fc2.bias
    gv = torch.sigmoid(torch.relu(mean @ W1.t() + b1) @ W2.t() + b2)
    want = torch.empty_like(x)
    for n in range(2):
        for c in range(C):
            s = c % S
            z = m.fc3.weight[s * hw:(s + 1) * hw, :, 0, 0] @ x[n, c].reshape(hw) + m.fc3.bias[s * hw:(s + 1) * hw]
            want[n, c] = gv[n, c] * z.reshape(h, w)
    with mixops.use_backend(backend):
        out = m(x)
    assert_close(out, want)
    assert_close(ref.global_perceptron_forward(m.gp, x), gv[:, :, None, None])


@pytest.mark.op("partition_fc")
def test_gp_gate_indexed_by_output_channel_in_scrambled_case(backend):
    _skip_unless_block_runs(backend, "partition_fc")
    C, S, h, w, hp, wp = 4, 1, 2, 3, 2, 2
    m = _block(C, h, w, S, deploy=True)
    x = torch.randn(2, C, hp * h, wp * w, dtype=F64)
    with torch.no_grad():
        gv = m.gp(x)[:, :, 0, 0]
        z = mixops.partition_fc(
            x, m.fc3.weight, m.fc3.bias, partition=(h, w), num_sharesets=S, backend=backend
        )
        hw, Q = h * w, C // S
        want = torch.full_like(x, float("nan"))
        by_input = torch.full_like(x, float("nan"))
        for n in range(2):
            for i in range(hp):
                for j in range(wp):
                    for q in range(Q):
                        rho = (i * wp + j) * Q + q
                        i2, j2 = (rho // wp) % hp, rho % wp
                        for s in range(S):
                            c_in, c_o = q * S + s, (rho // (hp * wp)) * S + s
                            v = x[n, c_in, i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(hw)
                            y = (m.fc3.weight[s * hw:(s + 1) * hw, :, 0, 0] @ v + m.fc3.bias[s * hw:(s + 1) * hw]).reshape(h, w)
                            sl = (n, c_o, slice(i2 * h, (i2 + 1) * h), slice(j2 * w, (j2 + 1) * w))
                            want[sl] = gv[n, c_o] * y
                            by_input[sl] = gv[n, c_in] * y
        with mixops.use_backend(backend):
            out = m(x)
    assert_close(z * gv[:, :, None, None], want)
    assert_close(out, want)
    assert not torch.allclose(out, by_input), "gating by the input channel must differ here"


def test_global_perceptron_keys_and_shape():
    gp = GlobalPerceptron(8, 2)
    assert list(gp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert gp(torch.randn(3, 8, 5, 5)).shape == (3, 8, 1, 1)


def test_forward_goes_through_the_backend(monkeypatch):
    # pretend no kernel is registered, so that "triton" is a backend the ops lack
    only_backends(monkeypatch, "partition_fc", "torch")
    only_backends(monkeypatch, "locality_injection", "torch")
    m = _block().eval()
    x = torch.randn(1, 8, 4, 4, dtype=F64)
    pfc_missing = "'triton' is not available for mixops.partition_fc; available: torch$"
    with mixops.use_backend("triton"), pytest.raises(ValueError, match=pfc_missing):
        m(x)
    with mixops.use_backend("triton"), pytest.raises(
        ValueError, match="'triton' is not available for mixops.locality_injection; available: torch$"
    ):
        m.local_inject()
    assert not m.deploy, "a failed local_inject must leave the block in train mode"
    m.local_inject()
    with mixops.use_backend("triton"), pytest.raises(ValueError, match=pfc_missing):
        m(x)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 6, 4, 4, dtype=F64), "inputs"),
        (torch.randn(2, 8, 6, 4, dtype=F64), "inputs height"),
        (torch.randn(2, 8, 4, 5, dtype=F64), "inputs width"),
        (torch.randn(8, 4, 4, dtype=F64), "inputs"),
    ],
)
def test_module_input_errors(x, match):
    with pytest.raises(ValueError, match=match):
        _block()(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(out_channels=4), "out_channels"),
        (dict(num_sharesets=3), "num_sharesets"),
        (dict(reparam_conv_k=(2, 3)), "reparam_conv_k"),
        (dict(reparam_conv_k=(3, 3)), "reparam_conv_k"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(in_channels=8, out_channels=8, h=4, w=4, num_sharesets=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RepMLPBlock(**args)
