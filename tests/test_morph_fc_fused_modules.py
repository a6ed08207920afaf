"""The fused MorphFC layer path of ``mixops.nn`` (branch ops with token means, reweight MLP,
reweighted proj): when it is taken, and MorphFC_S / MorphFC_S2 / MorphFC_T / PermutatorBlock
with a random state_dict loaded against the reference module forwards in fp32 (the fp64 runs
over every backend are in test_morph_fc_modules.py), forward and input / parameter grads."""
from __future__ import annotations

import copy

import pytest
import torch

import mixops
from mixops.nn import morph_fc as nn_morph
from mixops.nn.morph_fc import MorphFC_S, MorphFC_S2, MorphFC_T, PermutatorBlock
from mixops.reference import morph_fc as ref
from mixops_testing import assert_close, only_backends, skip_unless_runs

f64 = torch.float64


def _random_state(m: torch.nn.Module) -> torch.nn.Module:
    """m with a random state_dict loaded (strict), scaled so activations stay O(1)."""
    sd = {k: torch.randn(t.shape) / (t.shape[-1] ** 0.5 if t.dim() == 2 else 2) for k, t in m.state_dict().items()}
    m.load_state_dict(sd, strict=True)
    return m


def _check(m, x, fwd, backend, dtype, device="cpu"):
    m = m.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    with mixops.use_backend(backend):
        out = m(x)
    m64 = copy.deepcopy(m).to(f64)
    x64 = x.detach().to(f64).requires_grad_()
    expect = fwd(m64, x64)
    assert_close(out, expect, dtype)
    g = torch.randn(out.shape, dtype=f64, device=device)
    params = list(m.parameters())
    got = torch.autograd.grad(out, [x, *params], g.to(dtype))
    want = torch.autograd.grad(expect, [x64, *m64.parameters()], g)
    for a, b, n in zip(got, want, ["x"] + [n for n, _ in m.named_parameters()]):
        assert_close(a, b, dtype, name=f"grad {n}")


# (module, reference forward, x shape): wrap-around chunks, T > 1 / image, C = 84 with L = 14
MODULES = [
    (lambda: MorphFC_S(20, segment_dim=4, qkv_bias=True), ref.morph_fc_s_forward, (2, 3, 6, 10, 20)),
    (lambda: MorphFC_S(84, segment_dim=14, qkv_bias=True), ref.morph_fc_s_forward, (2, 4, 7, 84)),
    (lambda: MorphFC_S2(20, segment_dim=4), ref.morph_fc_s2_forward, (3, 1, 6, 10, 20)),
    (lambda: MorphFC_T(16, qkv_bias=True), ref.morph_fc_t_forward, (2, 8, 2, 3, 16)),
    (lambda: PermutatorBlock(16, 8, mlp_ratio=3, qkv_bias=True), ref.permutator_block_forward, (2, 8, 4, 6, 16)),
    (
        lambda: PermutatorBlock(16, 8, mlp_ratio=3, mlp_fn=MorphFC_S2),
        ref.permutator_block_forward,
        (2, 8, 4, 6, 16),
    ),
]


@pytest.mark.op("_reweighted_proj")
@pytest.mark.parametrize("case", MODULES, ids=["S", "S-image-84", "S2", "T", "block-S", "block-S2"])
def test_fused_modules_float32_match_float64_reference(case, backend):
    make, fwd, shape = case
    skip_unless_runs("_reweighted_proj", backend, "cpu")
    _check(_random_state(make()), torch.randn(shape), fwd, backend, torch.float32)


def test_fused_path_is_taken_where_the_backend_has_the_internal_ops(monkeypatch):
    skip_unless_runs("morph_fc", "triton", "cpu")
    x = torch.randn(1, 2, 4, 6, 16, dtype=f64)
    for name in ("torch", "triton"):
        with mixops.use_backend(name):
            assert mixops.backend.fused_backend("morph_fc", nn_morph._FUSED_OPS, x) == name
    # a backend with morph_fc alone runs the unfused path
    only_backends(monkeypatch, "_reweighted_proj", "torch")
    axes = []
    unfused = nn_morph.morph_fc
    monkeypatch.setattr(nn_morph, "morph_fc", lambda *a, **k: axes.append(k["axis"]) or unfused(*a, **k))
    m = _random_state(MorphFC_S(16, segment_dim=8)).double()
    with mixops.use_backend("triton"):
        assert mixops.backend.fused_backend("morph_fc", nn_morph._FUSED_OPS, x) is None
        out = m(x)
    assert axes == ["h", "w"]
    assert_close(out, ref.morph_fc_s_forward(m, x))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        (lambda: MorphFC_S(112, segment_dim=14, qkv_bias=True), ref.morph_fc_s_forward, (2, 1, 56, 56, 112)),
        (lambda: MorphFC_S(392, segment_dim=28, qkv_bias=True), ref.morph_fc_s_forward, (2, 2, 14, 14, 392)),
        (lambda: MorphFC_S2(784, segment_dim=49, qkv_bias=True), ref.morph_fc_s2_forward, (3, 2, 7, 7, 784)),
        (lambda: PermutatorBlock(112, 14, mlp_ratio=3, qkv_bias=True), ref.permutator_block_forward, (2, 8, 14, 14, 112)),
    ],
    ids=["S-s1", "S-s3", "S2-s4", "block"],
)
def test_gpu_fused_modules_match_float64(case, dtype, gpu_backend):
    if gpu_backend not in mixops.available_backends("_reweighted_proj"):
        pytest.skip(f"no {gpu_backend} backend here")
    make, fwd, shape = case
    _check(_random_state(make()), torch.randn(shape), fwd, gpu_backend, dtype, "cuda")
