"""Drop-in modules ``mixops.nn.morph_fc``: official state_dict keys and order, loading,
forward and gradients against the reference module forwards, temporal group rules,
image configs, DropPath, and module-level errors."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.nn.morph_fc import DropPath, Mlp, MorphFC_S, MorphFC_S2, MorphFC_T, PermutatorBlock
from mixops.reference import morph_fc as ref
from mixops_testing import assert_close, only_backends, skip_unless_runs

f64 = torch.float64

# docs/morph_fc.md section 7.1, one block, expanded in registration order
BLOCK_KEYS_S = [
    "norm1.weight", "norm1.bias",
    "t_norm1.weight", "t_norm1.bias",
    "t_fc.mlp_t.weight", "t_fc.mlp_t.bias",
    "t_fc.proj.weight", "t_fc.proj.bias",
    "fc.mlp_h.weight", "fc.mlp_h.bias",
    "fc.mlp_w.weight", "fc.mlp_w.bias",
    "fc.mlp_c.weight", "fc.mlp_c.bias",
    "fc.reweight.fc1.weight", "fc.reweight.fc1.bias",
    "fc.reweight.fc2.weight", "fc.reweight.fc2.bias",
    "fc.proj.weight", "fc.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip
BLOCK_KEYS_S2 = [
    "norm1.weight", "norm1.bias",
    "t_norm1.weight", "t_norm1.bias",
    "t_fc.mlp_t.weight", "t_fc.mlp_t.bias",
    "t_fc.proj.weight", "t_fc.proj.bias",
    "fc.mlp_c.weight", "fc.mlp_c.bias",
    "fc.mlp_h.weight", "fc.mlp_h.bias",
    "fc.reweight.fc1.weight", "fc.reweight.fc1.bias",
    "fc.reweight.fc2.weight", "fc.reweight.fc2.bias",
    "fc.proj.weight", "fc.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip
TOKEN_FC_BIASES = {"t_fc.mlp_t.bias", "fc.mlp_h.bias", "fc.mlp_w.bias", "fc.mlp_c.bias"}


def _shapes(C, ratio, K, width_t):
    """Parameter shapes of docs/morph_fc.md sections 4.1 / 5 / 6 / 7 for a block of width C."""
    hid = int(C * ratio)
    s = {"t_fc.mlp_t.weight": (width_t, width_t), "t_fc.mlp_t.bias": (width_t,)}
    for n in ("norm1", "t_norm1", "norm2"):
        s.update({f"{n}.weight": (C,), f"{n}.bias": (C,)})
    for n in ("t_fc.proj", "fc.proj", "fc.mlp_h", "fc.mlp_w", "fc.mlp_c"):
        s.update({f"{n}.weight": (C, C), f"{n}.bias": (C,)})
    s.update({
        "fc.reweight.fc1.weight": (C // 4, C), "fc.reweight.fc1.bias": (C // 4,),
        "fc.reweight.fc2.weight": (K * C, C // 4), "fc.reweight.fc2.bias": (K * C,),
        "mlp.fc1.weight": (hid, C), "mlp.fc1.bias": (hid,),
        "mlp.fc2.weight": (C, hid), "mlp.fc2.bias": (C,),
    })  # fmt: skip
    return s


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("mlp_fn,keys,K", [(MorphFC_S, BLOCK_KEYS_S, 3), (MorphFC_S2, BLOCK_KEYS_S2, 2)])
def test_block_state_dict_keys_shapes_and_loading(mlp_fn, keys, K, qkv_bias):
    m = PermutatorBlock(112, 14, mlp_ratio=3, qkv_bias=qkv_bias, mlp_fn=mlp_fn)
    expect = keys if qkv_bias else [k for k in keys if k not in TOKEN_FC_BIASES]
    sd = m.state_dict()
    assert list(sd.keys()) == expect
    shapes = _shapes(112, 3, K, 112)
    assert {k: tuple(t.shape) for k, t in sd.items()} == {k: shapes[k] for k in expect}
    official = {k: torch.randn(shapes[k]) for k in expect}
    m.load_state_dict(official, strict=True)
    for k, t in m.state_dict().items():
        assert torch.equal(t, official[k])


def test_module_key_lists():
    assert list(MorphFC_S(8, 4, qkv_bias=True).state_dict()) == [
        "mlp_h.weight", "mlp_h.bias", "mlp_w.weight", "mlp_w.bias", "mlp_c.weight", "mlp_c.bias",
        "reweight.fc1.weight", "reweight.fc1.bias", "reweight.fc2.weight", "reweight.fc2.bias",
        "proj.weight", "proj.bias",
    ]  # fmt: skip
    assert list(MorphFC_S2(8, 4).state_dict()) == [
        "mlp_c.weight", "mlp_h.weight",
        "reweight.fc1.weight", "reweight.fc1.bias", "reweight.fc2.weight", "reweight.fc2.bias",
        "proj.weight", "proj.bias",
    ]  # fmt: skip
    assert list(MorphFC_T(8, qkv_bias=True).state_dict()) == [
        "mlp_t.weight", "mlp_t.bias", "proj.weight", "proj.bias",
    ]  # fmt: skip
    assert list(Mlp(8, 24).state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize(
    "dim,frames,G,width",
    [(112, 16, 8, 112), (392, 16, 8, 392), (112, 32, 16, 112), (392, 32, 14, 448), (784, 32, 16, 784)],
)
def test_temporal_group_rule(dim, frames, G, width):
    m = MorphFC_T(dim, segment_dim=28, frames=frames)
    assert m.segment_dim == G
    assert tuple(m.mlp_t.weight.shape) == (width, width)
    assert tuple(m.proj.weight.shape) == (dim, dim)
    assert MorphFC_T(dim).segment_dim == 8  # default: the 16-frame file


def test_block_32_frame_stage3_temporal_width():
    m = PermutatorBlock(392, 28, mlp_ratio=3, qkv_bias=True, frames=32)
    assert tuple(m.state_dict()["t_fc.mlp_t.weight"].shape) == (448, 448)
    assert tuple(m.state_dict()["t_fc.mlp_t.bias"].shape) == (448,)


def _check_forward_and_grads(m, x, fwd, backend, dtype=f64):
    """Module (through mixops ops on ``backend``) vs the reference module forward on the same
    parameters; the backward runs on the backend its forward was recorded with."""
    skip_unless_runs("morph_fc", backend, x.device.type)
    m = m.to(dtype)
    x = x.to(dtype).requires_grad_()
    params = list(m.parameters())
    with mixops.use_backend(backend):
        out = m(x)
    expect = fwd(m, x)
    assert out.shape == x.shape
    assert_close(out, expect, dtype)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, *params])
    want = torch.autograd.grad((expect * g).sum(), [x, *params])
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for a, b, n in zip(got, want, names):
        assert_close(a, b, dtype, name=f"grad {n}")


# (H, W, L, C): wrap-around non-square; chunks of two full rows
SPATIAL = [(4, 6, 8, 16), (6, 4, 8, 16)]


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("T", [None, 1, 3])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("geom", SPATIAL)
@pytest.mark.parametrize(
    "cls,fwd", [(MorphFC_S, ref.morph_fc_s_forward), (MorphFC_S2, ref.morph_fc_s2_forward)]
)
def test_spatial_module_matches_reference(cls, fwd, geom, qkv_bias, T, backend):
    H, W, L, C = geom
    shape = (2, H, W, C) if T is None else (2, T, H, W, C)
    _check_forward_and_grads(cls(C, segment_dim=L, qkv_bias=qkv_bias), torch.randn(shape), fwd, backend)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize(
    "cls,fwd,shape,L",
    [
        (MorphFC_S, ref.morph_fc_s_forward, (2, 4, 7, 84), 14),  # image-T stage 1 channels, D = 6
        (MorphFC_S, ref.morph_fc_s_forward, (1, 4, 7, 168), 28),  # image-T stage 2 channels
        (MorphFC_S, ref.morph_fc_s_forward, (1, 2, 14, 336), 28),  # image-T stage 3 channels, D = 12
        (MorphFC_S2, ref.morph_fc_s2_forward, (1, 7, 7, 588), 49),  # image-T stage 4: one global chunk
    ],
)
def test_image_configs(cls, fwd, shape, L, backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    m = cls(shape[-1], segment_dim=L, qkv_bias=True).eval()
    x = torch.randn(shape)
    with torch.no_grad(), mixops.use_backend(backend):
        out = m(x)
        assert out.shape == x.shape
        assert_close(out, fwd(m.double(), x.double()), torch.float32)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize(
    "dim,frames,T", [(16, 16, 8), (32, 32, 16), (392, 32, 16)]
)
def test_temporal_module_matches_reference(dim, frames, T, backend):
    m = MorphFC_T(dim, qkv_bias=True, frames=frames)
    _check_forward_and_grads(m, torch.randn(1, T, 1, 2, dim), ref.morph_fc_t_forward, backend)


@pytest.mark.op("morph_fc")
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("mlp_fn", [MorphFC_S, MorphFC_S2])
def test_block_matches_reference(mlp_fn, qkv_bias, backend):
    m = PermutatorBlock(16, 8, mlp_ratio=3, qkv_bias=qkv_bias, mlp_fn=mlp_fn)
    _check_forward_and_grads(m, torch.randn(2, 8, 4, 6, 16), ref.permutator_block_forward, backend)


@pytest.mark.op("morph_fc")
def test_block_32_frames_stage3_matches_reference(backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    m = PermutatorBlock(392, 28, mlp_ratio=3, qkv_bias=True, frames=32).eval()
    x = torch.randn(1, 16, 2, 14, 392)
    with torch.no_grad():
        with mixops.use_backend(backend):
            out = m(x)
        assert_close(out, ref.permutator_block_forward(m.double(), x.double()), torch.float32)


@pytest.mark.op("morph_fc")
def test_block_float32_against_float64_reference(backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    m = PermutatorBlock(16, 8, mlp_ratio=3, qkv_bias=True).eval()
    x = torch.randn(2, 8, 4, 6, 16)
    with torch.no_grad():
        with mixops.use_backend(backend):
            out = m(x)
        assert_close(out, ref.permutator_block_forward(m.double(), x.double()), torch.float32)


def test_drop_path():
    x = torch.randn(64, 3, 4, dtype=f64)
    d = DropPath(0.25)
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    y = d.train()(x)
    per_sample = (y / x).reshape(64, -1)
    kept = per_sample[:, 0]
    assert torch.allclose(per_sample, kept[:, None])  # one decision per sample
    dropped = kept == 0
    assert torch.allclose(kept[~dropped], torch.full_like(kept[~dropped], 1 / 0.75))  # scaled by 1/keep
    assert 0 < int(dropped.sum()) < 64
    assert isinstance(PermutatorBlock(16, 8).drop_path, torch.nn.Identity)


@pytest.mark.op("morph_fc")
def test_block_drop_path_training_matches_reference(backend):
    skip_unless_runs("morph_fc", backend, "cpu")
    m = PermutatorBlock(16, 8, mlp_ratio=3, qkv_bias=True, drop_path=0.5).double().train()
    assert isinstance(m.drop_path, DropPath)
    x = torch.randn(6, 8, 4, 6, 16, dtype=f64)
    torch.manual_seed(1)
    with mixops.use_backend(backend):
        out = m(x)
    torch.manual_seed(1)
    assert_close(out, ref.permutator_block_forward(m, x))
    m.eval()
    with mixops.use_backend(backend):
        out = m(x)
    assert_close(out, ref.permutator_block_forward(m, x))


def test_modules_go_through_the_backend(monkeypatch):
    only_backends(monkeypatch, "morph_fc", "torch")
    x = torch.randn(1, 8, 4, 6, 16)
    for m in (MorphFC_S(16, 8), MorphFC_S2(16, 8), MorphFC_T(16), PermutatorBlock(16, 8)):
        with mixops.use_backend("triton"), pytest.raises(ValueError, match="available: torch"):
            m(x)


def test_exports():
    assert mixops.nn.MorphFC_S is MorphFC_S and mixops.nn.PermutatorBlock is PermutatorBlock
    assert mixops.nn.MorphFC_S2 is MorphFC_S2 and mixops.nn.MorphFC_T is MorphFC_T


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: MorphFC_S(16, 8)(torch.randn(1, 4, 6, 12)), ValueError, "x must have 16 channels"),
        (lambda: MorphFC_S(16, 8)(torch.randn(4, 6, 16)), ValueError, "x must have 4 or 5"),
        (lambda: MorphFC_S2(16, 8)(torch.randn(1, 5, 5, 16)), ValueError, r"H\*W.*segment_dim"),
        (lambda: MorphFC_S(18, 4)(torch.randn(1, 4, 6, 18)), ValueError, r"x channels.*segment_dim"),
        (lambda: MorphFC_T(16)(torch.randn(1, 4, 6, 16)), ValueError, "x must have 5"),
        (lambda: MorphFC_T(16)(torch.randn(1, 4, 1, 2, 16)), ValueError, r"x must have T = 8 frames"),
        (lambda: MorphFC_T(16, frames=8), ValueError, "frames"),
        (lambda: PermutatorBlock(16, 8)(torch.randn(1, 4, 6, 16)), ValueError, "x must have 5"),
        (lambda: PermutatorBlock(16, 8)(torch.randn(1, 8, 4, 6, 12)), ValueError, "x must have 16 channels"),
        (lambda: MorphFC_S(16, 8)(torch.randn(1, 4, 6, 16).long()), TypeError, "x must be float"),
    ],
)
def test_module_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
