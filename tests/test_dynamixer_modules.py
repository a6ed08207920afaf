"""Drop-in DynaMixerOp / DynaMixerBlock: official state_dict keys, loading, forward and gradients
against the reference module forwards, the docs/dynamixer.md section 8 linearity identities, when
the fused block path is taken (and the same numbers with a random state_dict in the official
keys), error paths.

The forward/backward comparisons take a ``backend`` argument: they run the module under
``mixops.use_backend`` once per backend registered for ``dynamixer_mix`` (tests/conftest.py),
against the reference module forward of a float64 copy."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixops
from mixops.backend import fused_backend
from mixops.nn import DynaMixerBlock, DynaMixerOp
from mixops.nn import dynamixer as nn_dyn
from mixops.reference import dynamixer as ref
from mixops_testing import assert_close, only_backends, skip_unless_runs

OP = "dynamixer_mix"  # the op the modules run through

OP_KEYS = [
    "out.weight",
    "out.bias",
    "compress.weight",
    "compress.bias",
    "generate.weight",
    "generate.bias",
]
# docs/dynamixer.md section 5, network.{k}.{j}.attn.* (qkv_bias=False: mlp_c has no bias)
BLOCK_KEYS = (
    [f"mix_h.{k}" for k in OP_KEYS]
    + [f"mix_w.{k}" for k in OP_KEYS]
    + [
        "mlp_c.weight",
        "reweight.fc1.weight",
        "reweight.fc1.bias",
        "reweight.fc2.weight",
        "reweight.fc2.bias",
        "proj.weight",
        "proj.bias",
    ]
)


def official_block_shapes(C, N, S, d):
    """docs/dynamixer.md section 5 shapes of one block's attn.* tensors."""
    op = {
        "out.weight": (C, C), "out.bias": (C,),
        "compress.weight": (S * d, C), "compress.bias": (S * d,),
        "generate.weight": (N * N, N * d), "generate.bias": (N * N,),
    }
    shapes = {f"{m}.{k}": v for m in ("mix_h", "mix_w") for k, v in op.items()}
    shapes.update({
        "mlp_c.weight": (C, C),
        "reweight.fc1.weight": (C // 4, C), "reweight.fc1.bias": (C // 4,),
        "reweight.fc2.weight": (3 * C, C // 4), "reweight.fc2.bias": (3 * C,),
        "proj.weight": (C, C), "proj.bias": (C,),
    })
    return shapes


def test_op_state_dict_keys_and_children():
    m = DynaMixerOp(12, 5, 3, reduced_dim=2)
    assert list(m.state_dict().keys()) == OP_KEYS
    assert [name for name, _ in m.named_children()] == ["out", "compress", "generate", "activation"]
    assert isinstance(m.activation, nn.Softmax) and m.activation.dim == -2
    assert m.compress.weight.shape == (6, 12) and m.generate.weight.shape == (25, 10)


def test_block_state_dict_keys_under_attn():
    container = nn.Module()
    container.attn = DynaMixerBlock(16, resolution=4, num_head=4)
    assert list(container.attn.state_dict().keys()) == BLOCK_KEYS
    assert list(container.state_dict().keys()) == [f"attn.{k}" for k in BLOCK_KEYS]
    names = [name for name, _ in container.attn.named_children()]
    assert names == ["mix_h", "mix_w", "mlp_c", "reweight", "proj", "proj_drop"]
    assert [name for name, _ in container.attn.reweight.named_children()] == ["fc1", "act", "fc2", "drop"]


@pytest.mark.parametrize("C, N, S, d", [(192, 32, 8, 2), (384, 16, 16, 2), (512, 16, 16, 8)])
def test_block_shapes_of_official_configs(C, N, S, d):
    """dynamixer_s stage 1 and stages 2-4, dynamixer_l stages 2-4 (docs/dynamixer.md sections 4 and 5)."""
    m = DynaMixerBlock(C, resolution=N, num_head=S, reduced_dim=d)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == official_block_shapes(C, N, S, d)


def test_block_with_qkv_bias_has_mlp_c_bias():
    keys = list(DynaMixerBlock(8, resolution=4, num_head=2, qkv_bias=True).state_dict().keys())
    assert keys == BLOCK_KEYS[:13] + ["mlp_c.bias"] + BLOCK_KEYS[13:]


def test_block_loads_official_state_dict_strictly():
    C, N, S, d = 16, 4, 4, 2
    sd = {k: torch.randn(shape) for k, shape in official_block_shapes(C, N, S, d).items()}
    m = DynaMixerBlock(C, resolution=N, num_head=S, reduced_dim=d)
    m.load_state_dict(sd, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, N, N, C)
    assert_close(m(x), ref.dynamixer_block_forward(m, x).detach(), name="loaded block")


def f64_copy(m, x):
    """A float64 copy of module ``m`` and of input ``x`` (a leaf that requires grad), for the
    reference side of a comparison."""
    return copy.deepcopy(m).double(), x.detach().double().requires_grad_()


@pytest.mark.op(OP)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_module_matches_reference(dtype, backend):
    skip_unless_runs(OP, backend, "cpu")
    m = DynaMixerOp(12, 5, 4, reduced_dim=3).to(dtype)
    x = torch.randn(6, 5, 12, dtype=dtype, requires_grad=True)
    with mixops.use_backend(backend):
        out = m(x)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *m.parameters()], g)
    m64, x64 = f64_copy(m, x)
    want = ref.dynamixer_op_forward(m64, x64)
    assert_close(out, want, dtype=dtype, name="DynaMixerOp")
    exp = torch.autograd.grad(want, [x64, *m64.parameters()], g.double())
    for name, a, b in zip(["x", *OP_KEYS], got, exp):
        assert_close(a, b, dtype=dtype, name=f"grad {name}")


def _random_state(m: nn.Module) -> nn.Module:
    """m with a random state_dict in the official keys loaded (strict), scaled so activations
    stay O(1)."""
    sd = {k: torch.randn(t.shape) / (t.shape[-1] ** 0.5 if t.dim() == 2 else 2) for k, t in m.state_dict().items()}
    m.load_state_dict(sd, strict=True)
    return m


def _check_block(m, x, backend, dtype, device="cpu"):
    """Block forward and every gradient (x and each parameter) on ``backend`` in ``dtype``
    against the reference block forward of a float64 copy."""
    m = m.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    names, params = zip(*m.named_parameters())
    with mixops.use_backend(backend):
        out = m(x)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *params], g)
    m64, x64 = f64_copy(m, x)
    want = ref.dynamixer_block_forward(m64, x64)
    assert_close(out, want, dtype=dtype, name="DynaMixerBlock")
    exp = torch.autograd.grad(want, [x64, *m64.parameters()], g.double())
    for name, a, b in zip(["x", *names], got, exp):
        assert_close(a, b, dtype=dtype, name=f"grad {name}")


@pytest.mark.op(OP)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C, N, S, d, qkv_bias", [(16, 4, 4, 2, False), (24, 5, 3, 8, True)])
def test_block_module_matches_reference(C, N, S, d, qkv_bias, dtype, backend):
    skip_unless_runs(OP, backend, "cpu")
    m = DynaMixerBlock(C, resolution=N, num_head=S, reduced_dim=d, qkv_bias=qkv_bias)
    _check_block(m, torch.randn(2, N, N, C), backend, dtype)


@pytest.mark.op(OP)
def test_block_channels_last_view_input(backend):
    """x as a channels-last view of an NCHW tensor (the usual layout after a conv)."""
    skip_unless_runs(OP, backend, "cpu")
    m = DynaMixerBlock(8, resolution=4, num_head=2).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64).permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    with mixops.use_backend(backend):
        out = m(x)
    assert_close(out, ref.dynamixer_block_forward(m, x.contiguous()).detach())


@pytest.mark.op(OP)
@pytest.mark.parametrize("C, N, S, d", [(24, 5, 3, 2), (32, 17, 4, 1)])
def test_block_random_state_dict_float32(C, N, S, d, backend):
    """C/S = 8 with N = 5, and N = 17 (two q-blocks of the kernels) with d = 1."""
    skip_unless_runs(OP, backend, "cpu")
    m = _random_state(DynaMixerBlock(C, resolution=N, num_head=S, reduced_dim=d))
    _check_block(m, torch.randn(2, N, N, C), backend, torch.float32)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("gpu_backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C, N, S, d", [(192, 32, 8, 2), (384, 16, 16, 2), (512, 16, 16, 8)], ids=["S-s1", "S-s2", "L-s2"])
def test_gpu_fused_block_matches_float64(C, N, S, d, dtype, gpu_backend):
    """The official block shapes (docs/dynamixer.md section 7), B = 3, on the GPU."""
    skip_unless_runs(OP, gpu_backend, "cuda")
    m = _random_state(DynaMixerBlock(C, resolution=N, num_head=S, reduced_dim=d))
    _check_block(m, torch.randn(3, N, N, C), gpu_backend, dtype, "cuda")


def test_block_fused_path_is_taken_where_the_backend_has_the_internal_ops(monkeypatch):
    skip_unless_runs(OP, "triton", "cpu")
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    for name in ("torch", "triton"):
        with mixops.use_backend(name):
            assert fused_backend(OP, nn_dyn._FUSED_OPS, x) == name
    # a backend with dynamixer_mix alone runs the official sequence through the public op
    only_backends(monkeypatch, "_dynamixer_axis_mix", "torch")
    seqs = []
    public = nn_dyn.dynamixer_mix
    monkeypatch.setattr(nn_dyn, "dynamixer_mix", lambda *a, **k: seqs.append(a[0].shape) or public(*a, **k))
    m = _random_state(DynaMixerBlock(8, resolution=4, num_head=2)).double()
    with mixops.use_backend("triton"):
        assert fused_backend(OP, nn_dyn._FUSED_OPS, x) is None
        out = m(x)
    assert seqs == [(4, 4, 8), (4, 4, 8)]
    assert_close(out, ref.dynamixer_block_forward(m, x))


def test_block_eval_ignores_proj_drop():
    m = DynaMixerBlock(8, resolution=4, num_head=2, proj_drop=0.5).double().eval()
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    assert_close(m(x), ref.dynamixer_block_forward(m, x))


def test_modules_route_through_the_selected_backend(monkeypatch):
    only_backends(monkeypatch, OP, "torch")  # the message names what is registered
    m = DynaMixerBlock(8, resolution=4, num_head=2)
    x = torch.randn(1, 4, 4, 8)
    with mixops.use_backend("triton"), pytest.raises(ValueError, match="available: torch"):
        m(x)


def test_mean_of_out_is_out_of_mean():
    """docs/dynamixer.md section 8: mean over tokens of out(y) = out.weight . mean(y) + out.bias."""
    m = DynaMixerOp(12, 5, 3).double()
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    y = mixops.dynamixer_mix(x, m.compress.weight, m.compress.bias, m.generate.weight,
                             m.generate.bias, num_head=3, reduced_dim=2)
    assert_close(m(x).mean(dim=1), F.linear(y.mean(dim=1), m.out.weight, m.out.bias))


def test_block_two_pass_folding():
    """docs/dynamixer.md section 8 for the whole block: pass 1 needs only per-(b, c) means of the mixed
    features of both ops and of x; pass 2 is one K = 3C GEMM with per-sample scaled weights."""
    B, N, C, S = 2, 4, 16, 4
    m = DynaMixerBlock(C, resolution=N, num_head=S).double()
    x = torch.randn(B, N, N, C, dtype=torch.float64)

    def mix(op, seqs):
        return mixops.dynamixer_mix(seqs, op.compress.weight, op.compress.bias, op.generate.weight,
                                    op.generate.bias, num_head=S, reduced_dim=op.reduced_dim)

    yh = mix(m.mix_h, x.transpose(1, 2).reshape(B * N, N, C)).reshape(B, N, N, C).transpose(1, 2)
    yw = mix(m.mix_w, x.reshape(B * N, N, C)).reshape(B, N, N, C)
    Wh, bh, Ww, bw, Wc = m.mix_h.out.weight, m.mix_h.out.bias, m.mix_w.out.weight, m.mix_w.out.bias, m.mlp_c.weight

    # pass 1: the reweight input from means only
    a = yh.mean((1, 2)) @ Wh.T + bh + yw.mean((1, 2)) @ Ww.T + bw + x.mean((1, 2)) @ Wc.T
    h, w, c = yh @ Wh.T + bh, yw @ Ww.T + bw, x @ Wc.T
    assert_close(a, (h + w + c).mean((1, 2)), name="pass-1 means")

    # pass 2: per-sample weights [B, 3C, C] scaled by the branch weights, one GEMM, then proj
    al = ref.mlp_forward(m.reweight, a).reshape(B, C, 3).softmax(-1)
    folded = torch.cat([Wh.T * al[:, None, :, 0], Ww.T * al[:, None, :, 1], Wc.T * al[:, None, :, 2]], dim=1)
    bias = al[..., 0] * bh + al[..., 1] * bw
    z = torch.cat([yh, yw, x], dim=-1).reshape(B, N * N, 3 * C) @ folded + bias[:, None, :]
    y = F.linear(z, m.proj.weight, m.proj.bias).reshape(B, N, N, C)
    assert_close(y, m(x).detach(), name="folded block")


def test_op_module_errors():
    m = DynaMixerOp(12, 5, 3)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 6, 12))  # L != seq_len
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 8))  # C != dim
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(5, 12))
    with pytest.raises(TypeError, match="x"):
        m([[0.0] * 12] * 5)
    with pytest.raises(ValueError, match="num_head"):
        DynaMixerOp(10, 5, 4)(torch.randn(2, 5, 10))


def test_block_module_errors():
    m = DynaMixerBlock(8, resolution=4, num_head=2)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 4, 5, 8))  # H != W
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 5, 5, 8))  # H == W != resolution
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(4, 4, 8))
    with pytest.raises(ValueError, match="num_head"):
        DynaMixerBlock(10, resolution=4, num_head=4)(torch.randn(1, 4, 4, 10))
