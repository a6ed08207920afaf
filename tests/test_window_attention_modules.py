"""Drop-in modules ``mixops.nn.{Attention, SABlock, SABlock_Windows}`` and ``mixops.nn.video.SABlock``.

The forward/backward checks against the reference modules take a ``backend`` argument: they run
once per backend registered for ``window_attention``, the module inside ``mixops.use_backend``.
"""
from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch
import torch.nn as nn

import mixops
from mixops.nn import Attention, SABlock, SABlock_Windows
from mixops.nn import video
from mixops.reference import window_attention as ref
from mixops_testing import assert_close, only_backends, skip_unless_runs

OP = "window_attention"  # the op the modules run through

HEADS, D = 2, 8
C = HEADS * D
LN6 = partial(nn.LayerNorm, eps=1e-6)  # what the official backbones pass

# official key lists (docs/window_attention.md section 2.2: pos_embed, norm1, attn.qkv, attn.proj, norm2, mlp), in order
KEYS = [
    "pos_embed.weight", "pos_embed.bias",
    "norm1.weight", "norm1.bias",
    "attn.qkv.weight", "attn.qkv.bias",
    "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]
KEYS_NO_QKV_BIAS = [k for k in KEYS if k != "attn.qkv.bias"]


def _randomize(m: nn.Module) -> nn.Module:
    """Non-trivial values everywhere (biases and LayerNorm affine included)."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("cls", [SABlock, SABlock_Windows, video.SABlock])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_state_dict_keys(cls, qkv_bias):
    m = cls(C, HEADS, qkv_bias=qkv_bias)
    assert list(m.state_dict().keys()) == (KEYS if qkv_bias else KEYS_NO_QKV_BIAS)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    k = 3 if cls is video.SABlock else 2
    assert shapes["pos_embed.weight"] == (C, 1) + (3,) * k
    assert shapes["mlp.fc1.weight"] == (4 * C, C)
    if qkv_bias:
        assert shapes["attn.qkv.bias"] == (3 * C,)


def test_attention_keys():
    assert list(Attention(C, HEADS, qkv_bias=True).state_dict()) == [
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"
    ]
    assert list(Attention(C, HEADS).state_dict()) == ["qkv.weight", "proj.weight", "proj.bias"]


def test_constructor_signatures():
    """Official argument names, order and defaults."""
    common = [
        ("mlp_ratio", 4.0), ("qkv_bias", False), ("qk_scale", None), ("drop", 0.0),
        ("attn_drop", 0.0), ("drop_path", 0.0), ("act_layer", nn.GELU), ("norm_layer", nn.LayerNorm),
    ]
    required = [("dim", inspect.Parameter.empty), ("num_heads", inspect.Parameter.empty)]

    def params(cls):
        return [(p.name, p.default) for p in list(inspect.signature(cls.__init__).parameters.values())[1:]]

    assert params(SABlock) == required + common
    assert params(video.SABlock) == required + common
    assert params(SABlock_Windows) == required + [("window_size", 14)] + common
    assert params(Attention) == [
        ("dim", inspect.Parameter.empty), ("num_heads", 8), ("qkv_bias", False),
        ("qk_scale", None), ("attn_drop", 0.0), ("proj_drop", 0.0),
    ]


def test_random_official_state_dict_loads():
    sd = {k: torch.randn_like(v) for k, v in SABlock(C, HEADS, qkv_bias=True).state_dict().items()}
    for m in (SABlock(C, HEADS, qkv_bias=True), SABlock_Windows(C, HEADS, 4, qkv_bias=True)):
        m.load_state_dict(sd, strict=True)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


def test_global_checkpoint_loads_into_windowed_block():
    """A global-trained block loads into SABlock_Windows; on one full window they agree."""
    g = _randomize(SABlock(C, HEADS, qkv_bias=True, norm_layer=LN6)).double()
    w = SABlock_Windows(C, HEADS, window_size=6, qkv_bias=True, norm_layer=LN6).double()
    w.load_state_dict(g.state_dict(), strict=True)
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    assert_close(w(x), g(x))
    x = torch.randn(2, C, 7, 6, dtype=torch.float64)
    assert (w(x) - g(x)).abs().max() > 1e-3  # windowed with padding is not global


def test_hybrid_stage_from_global_checkpoint():
    """docs/window_attention.md section 2.2: a hybrid stage 3 built per stage3_block_types loads a global stage unchanged."""
    types = ref.stage3_block_types(8, windows=False, hybrid=True)
    glob = nn.ModuleList(SABlock(C, HEADS, qkv_bias=True, norm_layer=LN6) for _ in types)
    hybrid = nn.ModuleList(
        SABlock(C, HEADS, qkv_bias=True, norm_layer=LN6) if t == "global"
        else SABlock_Windows(C, HEADS, 4, qkv_bias=True, norm_layer=LN6)
        for t in types
    )
    hybrid.load_state_dict(glob.state_dict(), strict=True)
    assert [type(b).__name__ for b in hybrid].count("SABlock") == 2


# (H, W, ws): divisible, padded on one or both axes, ws larger than the map
WINDOW_SHAPES = [(8, 8, 4), (7, 9, 4), (5, 3, 4), (3, 2, 5)]


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("H, W, ws", WINDOW_SHAPES)
@pytest.mark.op(OP)
def test_windows_block_matches_reference(H, W, ws, qkv_bias, backend):
    m = _randomize(SABlock_Windows(C, HEADS, window_size=ws, qkv_bias=qkv_bias, norm_layer=LN6)).double()
    _check_forward_backward(m, ref.sablock_windows_forward, torch.randn(2, C, H, W, dtype=torch.float64), backend)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.op(OP)
def test_global_block_matches_reference(qkv_bias, backend):
    m = _randomize(SABlock(C, HEADS, qkv_bias=qkv_bias, norm_layer=LN6)).double()
    _check_forward_backward(m, ref.sablock_forward, torch.randn(2, C, 5, 7, dtype=torch.float64), backend)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.op(OP)
def test_video_block_matches_reference(qkv_bias, backend):
    m = _randomize(video.SABlock(C, HEADS, qkv_bias=qkv_bias, norm_layer=LN6)).double()
    _check_forward_backward(m, ref.video_sablock_forward, torch.randn(2, C, 3, 4, 5, dtype=torch.float64), backend)


@pytest.mark.op(OP)
def test_attention_matches_reference(backend):
    m = _randomize(Attention(C, HEADS, qkv_bias=True, qk_scale=0.3)).double()
    _check_forward_backward(m, ref.attention_forward, torch.randn(3, 11, C, dtype=torch.float64), backend)


def _check_forward_backward(m, reference, x, backend):
    """Module output and all gradients (input and parameters), the module run with ``backend``,
    equal the reference module forward's, float64."""
    skip_unless_runs(OP, backend, x.device.type)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    with mixops.use_backend(backend):
        out = m(x1)
    want = reference(m, x2)
    assert_close(out, want)
    g = torch.randn_like(out)
    params = list(m.parameters())
    with mixops.use_backend(backend):
        got = torch.autograd.grad(out, [x1, *params], g)
    exp = torch.autograd.grad(want, [x2, *params], g)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, exp):
        assert_close(a, b, name=f"grad {name}")


@pytest.mark.op(OP)
def test_float32_module_against_float64_reference(backend):
    skip_unless_runs(OP, backend, "cpu")
    m = _randomize(SABlock_Windows(C, HEADS, window_size=4, qkv_bias=True, norm_layer=LN6))
    x = torch.randn(2, C, 7, 9)
    want = ref.sablock_windows_forward(m.double(), x.double())
    with mixops.use_backend(backend):
        got = m.float()(x)
    assert_close(got, want, dtype=torch.float32)


@pytest.mark.op(OP)
def test_train_mode_with_official_rates_matches_reference(backend):
    """Training mode with the official drop rates (0) and drop-path (identity in eval)."""
    skip_unless_runs(OP, backend, "cpu")
    m = _randomize(SABlock_Windows(C, HEADS, window_size=4, qkv_bias=True, norm_layer=LN6)).double()
    x = torch.randn(1, C, 6, 5, dtype=torch.float64)
    with mixops.use_backend(backend):
        got = m.train()(x)
    assert_close(got, ref.sablock_windows_forward(m, x))
    m = _randomize(SABlock(C, HEADS, qkv_bias=True, drop_path=0.2, norm_layer=LN6)).double().eval()
    with mixops.use_backend(backend):
        got = m(x)
    assert_close(got, ref.sablock_forward(m, x))


def test_modules_use_the_op_backend(monkeypatch):
    """The token mixing goes through mixops.window_attention: its backend selection applies."""
    only_backends(monkeypatch, OP, "torch")  # so that "triton" is missing whatever is registered
    x = torch.randn(1, C, 4, 4)
    for m in (SABlock(C, HEADS), SABlock_Windows(C, HEADS, 2)):
        with mixops.use_backend("triton"), pytest.raises(ValueError, match="available: torch"):
            m(x)
    with mixops.use_backend("triton"), pytest.raises(ValueError, match="available: torch"):
        video.SABlock(C, HEADS)(torch.randn(1, C, 2, 2, 2))


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: SABlock_Windows(C, HEADS), torch.randn(1, C + 1, 4, 4)),
        (lambda: SABlock_Windows(C, HEADS), torch.randn(C, 4, 4)),
        (lambda: SABlock(C, HEADS), torch.randn(1, 4, 4, C)),
        (lambda: video.SABlock(C, HEADS), torch.randn(1, C, 4, 4)),
        (lambda: Attention(C, HEADS), torch.randn(2, 4, C + 2)),
        (lambda: Attention(C, HEADS), torch.randn(2, 4, 4, C)),
    ],
)
def test_bad_module_input(make, x):
    with pytest.raises(ValueError, match="x"):
        make()(x)


def test_attention_dropout_in_training_is_refused():
    m = SABlock_Windows(C, HEADS, 4, attn_drop=0.1)
    x = torch.randn(1, C, 4, 4)
    with pytest.raises(ValueError, match="attn_drop"):
        m.train()(x)
    assert m.eval()(x).shape == x.shape
