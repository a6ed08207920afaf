"""Drop-in modules (mixops.nn.atm): official state_dict keys, loading, forward/backward against
the module-level reference, the offset schedule over stages, and module-level errors."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.nn.atm import PEG, ATMLayer, ATMOp, ActiveBlock, Downsample, DropPath, Mlp
from mixops.reference import atm as R
from mixops_testing import assert_close, only_backends, skip_unless_runs

C = 8
OP = "atm_fc"  # the op every ATM module runs through (ATMOp, ATMLayer, ActiveBlock)


def _atm_layer_keys(prefix: str, C: int) -> list[tuple[str, tuple]]:
    # docs/atm.md section 9, in registration order
    return [
        (f"{prefix}atm_c.weight", (C, C)),
        (f"{prefix}atm_h.weight", (C, C, 1, 1)),
        (f"{prefix}atm_h.bias", (C,)),
        (f"{prefix}atm_w.weight", (C, C, 1, 1)),
        (f"{prefix}atm_w.bias", (C,)),
        (f"{prefix}fusion.fc1.weight", (C // 4, C)),
        (f"{prefix}fusion.fc1.bias", (C // 4,)),
        (f"{prefix}fusion.fc2.weight", (3 * C, C // 4)),
        (f"{prefix}fusion.fc2.bias", (3 * C,)),
        (f"{prefix}proj.weight", (C, C)),
        (f"{prefix}proj.bias", (C,)),
    ]


def _block_keys(C: int, r: int, S: int, C_next: int) -> list[tuple[str, tuple]]:
    """An ActiveBlock with downsample and offset_layer (docs/atm.md section 2.3 order, section 9 keys)."""
    return (
        [("norm1.weight", (C,)), ("norm1.bias", (C,))]
        + _atm_layer_keys("atm.", C)
        + [
            ("norm2.weight", (C,)),
            ("norm2.bias", (C,)),
            ("mlp.fc1.weight", (r * C, C)),
            ("mlp.fc1.bias", (r * C,)),
            ("mlp.fc2.weight", (C, r * C)),
            ("mlp.fc2.bias", (C,)),
            ("downsample.proj.weight", (C_next, C, 3, 3)),
            ("downsample.proj.bias", (C_next,)),
            ("offset_layer.0.weight", (C,)),
            ("offset_layer.0.bias", (C,)),
            ("offset_layer.1.weight", (2 * C // S, C)),
            ("offset_layer.1.bias", (2 * C // S,)),
        ]
    )


def _random_state(keys):
    return {k: torch.randn(shape, dtype=torch.float64) * 0.3 for k, shape in keys}


def _state_shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def test_atm_layer_state_dict_keys():
    m = ATMLayer(C)
    assert _state_shapes(m) == _atm_layer_keys("", C)
    assert [name for name, _ in m.named_children()] == [
        "atm_c", "atm_h", "atm_w", "fusion", "proj", "proj_drop"
    ]
    assert [name for name, _ in m.fusion.named_children()] == ["fc1", "act", "fc2", "drop"]
    assert isinstance(m.fusion.act, torch.nn.GELU) and m.fusion.act.approximate == "none"


def test_active_block_state_dict_keys():
    blk = ActiveBlock(C, mlp_ratio=4.0, share_dim=2, downsample=Downsample(C, 16), new_offset=True)
    assert _state_shapes(blk) == _block_keys(C, 4, 2, 16)
    assert [name for name, _ in blk.named_children()] == [
        "norm1", "atm", "norm2", "mlp", "drop_path", "downsample", "offset_layer"
    ]
    plain = ActiveBlock(C, mlp_ratio=8.0, share_dim=4)
    want = [(k, s) for k, s in _block_keys(C, 8, 4, 16) if not k.startswith(("downsample", "offset_layer"))]
    assert _state_shapes(plain) == want
    assert plain.offset_layer is None and plain.downsample is None
    assert blk.norm1.eps == 1e-5


def test_peg_and_atmop_keys():
    assert _state_shapes(PEG(C, C)) == [("proj.weight", (C, 1, 3, 3)), ("proj.bias", (C,))]
    assert _state_shapes(ATMOp(C, 6, bias=False, dimension="h")) == [("weight", (6, C, 1, 1))]


@pytest.mark.op(OP)
def test_load_official_state_dict_and_match_reference(backend):
    skip_unless_runs(OP, backend, "cpu")
    blk = ActiveBlock(C, share_dim=2, downsample=Downsample(C, 16), new_offset=True).double().eval()
    state = _random_state(_block_keys(C, 4, 2, 16))
    blk.load_state_dict(state, strict=True)
    for k, v in blk.state_dict().items():
        assert torch.equal(v, state[k])
    x = torch.randn(2, 6, 5, C, dtype=torch.float64)
    with mixops.use_backend(backend):
        out, off = blk(x)
    ref_out, ref_off = R.active_block_forward(blk, x)
    assert out.shape == (2, 3, 3, 16)
    assert_close(out, ref_out)
    assert torch.equal(off, ref_off)


def _randomize(m: torch.nn.Module, std=0.3):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m


@pytest.mark.op(OP)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_atm_layer_matches_reference(dtype, backend):
    skip_unless_runs(OP, backend, "cpu")
    B, H, W = 2, 5, 6
    m = _randomize(ATMLayer(C)).to(dtype)
    x = torch.randn(B, H, W, C, dtype=dtype, requires_grad=True)
    # the official offset is a permuted (non-contiguous) view
    offset = (torch.randn(B, H, W, 2 * C, dtype=dtype) * 2).permute(0, 3, 1, 2).requires_grad_()
    g = torch.randn(B, H, W, C, dtype=dtype)
    leaves = [x, offset, *m.parameters()]
    with mixops.use_backend(backend):
        out = m(x, offset)
        got = torch.autograd.grad(out, leaves, g)

    m64 = ATMLayer(C).double()
    m64.load_state_dict(m.state_dict())
    x64, off64 = x.detach().double().requires_grad_(), offset.detach().double().requires_grad_()
    ref = R.atm_layer_forward(m64, x64, off64)
    want = torch.autograd.grad(ref, [x64, off64, *m64.parameters()], g.double())
    assert_close(out, ref, name="ATMLayer")
    names = ["x", "offset"] + [n for n, _ in m.named_parameters()]
    for name, a, e in zip(names, got, want):
        assert_close(a, e, name=f"grad {name}")


def test_atm_layer_goes_through_the_mixops_ops(monkeypatch):
    """The backend choice reaches the layer: an unavailable backend is an error, not a silent
    fallback."""
    only_backends(monkeypatch, OP, "torch")  # whatever kernels are registered
    m = ATMLayer(C).double()
    x = torch.randn(1, 3, 4, C, dtype=torch.float64)
    offset = torch.randn(1, 2 * C, 3, 4, dtype=torch.float64)
    with mixops.use_backend("triton"), pytest.raises(ValueError, match="available: torch"):
        m(x, offset)


@pytest.mark.op(OP)
@pytest.mark.parametrize("share", [2, 4, 8])
def test_forward_compact_equals_official_offset(share, backend):
    skip_unless_runs(OP, backend, "cpu")
    m = _randomize(ATMLayer(C)).double()
    x = torch.randn(2, 4, 5, C, dtype=torch.float64)
    o = torch.randn(2, 4, 5, 2 * C // share, dtype=torch.float64) * 2
    G = C // share
    offset = o.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)
    with mixops.use_backend(backend):
        compact = m.forward_compact(x, o[..., :G], o[..., G:], share=share)
        full = m(x, offset)
    ref = R.atm_layer_forward(m, x, offset)
    assert_close(compact, ref, name="forward_compact")
    assert_close(full, ref, name="forward")


@pytest.mark.op(OP)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dimension", ["h", "w"])
def test_atm_op_matches_reference(dimension, bias, backend):
    skip_unless_runs(OP, backend, "cpu")
    m = ATMOp(C, 6, bias=bias, dimension=dimension).double()
    x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
    off = (torch.randn(2, C, 5, 4, dtype=torch.float64) * 3).requires_grad_()
    g = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    leaves = [x, off, *m.parameters()]
    with mixops.use_backend(backend):
        out = m(x, off)
        got = torch.autograd.grad(out, leaves, g)
    ref = R.atm_op_forward(m, x, off)
    assert out.shape == (2, 6, 5, 4)
    assert_close(out, ref)
    names = ["input", "offset"] + [n for n, _ in m.named_parameters()]
    for name, a, e in zip(names, got, torch.autograd.grad(ref, leaves, g)):
        assert_close(a, e, name=f"grad {name}")


@pytest.mark.op(OP)
def test_atm_op_dilation_is_inert(backend):
    skip_unless_runs(OP, backend, "cpu")
    m = ATMOp(C, C, dilation=3, dimension="w").double()
    x = torch.randn(1, C, 3, 4, dtype=torch.float64)
    off = torch.randn(1, C, 3, 4, dtype=torch.float64)
    with mixops.use_backend(backend):
        out = m(x, off)
    assert_close(out, R.atm_op_forward(m, x, off))


def test_atm_op_init_matches_official_scheme():
    torch.manual_seed(1)
    m = ATMOp(64, 32, dimension="h")
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64 gives the same bound as the bias
    assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
    assert m.bias.abs().max() <= bound
    assert m.stride == (1, 1) and m.padding == (0, 0) and m.dilation == (1, 1)


@pytest.mark.op(OP)
@pytest.mark.parametrize("share", [2, 4])
def test_generating_block_matches_reference(share, backend):
    skip_unless_runs(OP, backend, "cpu")
    blk = _randomize(ActiveBlock(C, share_dim=share, new_offset=True), std=0.5).double()
    x = torch.randn(2, 4, 5, C, dtype=torch.float64, requires_grad=True)
    with mixops.use_backend(backend):
        out, off = blk(x)
    ref_out, ref_off = R.active_block_forward(blk, x)
    assert_close(out, ref_out)
    assert_close(off, ref_off)
    g, go = torch.randn_like(out), torch.randn_like(off)
    leaves = [x, *blk.parameters()]
    with mixops.use_backend(backend):
        got = torch.autograd.grad((out * g).sum() + (off * go).sum(), leaves)
    want = torch.autograd.grad((ref_out * g).sum() + (ref_off * go).sum(), leaves)
    names = ["x"] + [n for n, _ in blk.named_parameters()]
    for name, a, e in zip(names, got, want):
        assert_close(a, e, name=f"grad {name}")


@pytest.mark.op(OP)
def test_block_reuses_given_offset(backend):
    skip_unless_runs(OP, backend, "cpu")
    gen = _randomize(ActiveBlock(C, share_dim=2, new_offset=True)).double()
    plain = _randomize(ActiveBlock(C, share_dim=2, downsample=Downsample(C, 12))).double()
    x = torch.randn(1, 4, 6, C, dtype=torch.float64)
    offset = torch.randn(1, 2 * C, 4, 6, dtype=torch.float64)
    with mixops.use_backend(backend):
        out = plain(x, offset)
        out_gen, off = gen(x, offset)  # a generating block given an offset uses it and hands it back
    assert out.shape == (1, 2, 3, 12)
    assert_close(out, R.active_block_forward(plain, x, offset))
    assert off is offset
    assert_close(out_gen, R.active_block_forward(gen, x, offset)[0])


@pytest.mark.op(OP)
def test_stages_follow_the_offset_schedule(backend):
    """Two tiny stages built as ActiveMLP builds them: PEG shared per stage before every
    generating block, stale offsets reused, downsample at the last block of stage 0."""
    skip_unless_runs(OP, backend, "cpu")
    depths, dims, shares, intv = [3, 4], [8, 16], [2, 4], 2
    schedule = R.offset_schedule(depths, intv)
    assert schedule == [[0], [0, 2]]
    blocks = torch.nn.ModuleList()
    for i, d in enumerate(depths):
        blocks.append(torch.nn.ModuleList([
            ActiveBlock(
                dims[i], share_dim=shares[i], new_offset=j in schedule[i],
                downsample=Downsample(dims[i], dims[i + 1]) if i < len(depths) - 1 and j == d - 1 else None,
            )
            for j in range(d)
        ]))
    pos_blocks = torch.nn.ModuleList([PEG(dm, dm) for dm in dims])
    _randomize(blocks, std=0.2).double()
    _randomize(pos_blocks, std=0.2).double()

    x0 = torch.randn(2, 6, 6, dims[0], dtype=torch.float64)
    x = x0
    with mixops.use_backend(backend):
        for i in range(len(depths)):
            for j, blk in enumerate(blocks[i]):
                if j in schedule[i]:
                    x = pos_blocks[i](x)
                    x, offset = blk(x)
                else:
                    x = blk(x, offset)
        out = x.reshape(x.shape[0], -1, x.shape[-1])
        # stage 1's PEG runs twice (blocks 0 and 2): its gradient collects both uses on both sides
        peg_w = pos_blocks[1].proj.weight
        got = torch.autograd.grad(out.sum(), peg_w)[0]
    ref = R.forward_blocks(blocks, pos_blocks, intv, x0)
    assert out.shape == (2, 9, 16)
    assert_close(out, ref)
    assert_close(got, torch.autograd.grad(ref.sum(), peg_w)[0], name="grad PEG weight")


def test_peg_and_downsample_match_reference():
    x = torch.randn(2, 5, 7, C, dtype=torch.float64)
    peg = _randomize(PEG(C, C)).double()
    assert_close(peg(x), R.peg_forward(peg, x))
    assert_close(peg(x) - x, torch.nn.functional.conv2d(
        x.permute(0, 3, 1, 2), peg.proj.weight, peg.proj.bias, padding=1, groups=C).permute(0, 2, 3, 1))
    ds = Downsample(C, 12).double()
    assert ds(x).shape == (2, 3, 4, 12)
    assert_close(ds(x), R.downsample_forward(ds, x))


def test_mlp_and_drop_path():
    mlp = Mlp(C, 16).double()
    x = torch.randn(3, 4, C, dtype=torch.float64)
    assert_close(mlp(x), R.mlp_forward(mlp, x))
    dp = DropPath(0.5)
    y = torch.ones(64, 2, 3)
    assert torch.equal(dp.eval()(y), y)
    out = dp.train()(y)
    kept = out[:, 0, 0] != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 2.0))  # kept samples scaled by 1/keep
    assert 0 < int(kept.sum()) < 64
    assert (out[~kept] == 0).all()
    blk = ActiveBlock(C, drop_path=0.1)
    assert isinstance(blk.drop_path, DropPath) and list(blk.drop_path.parameters()) == []


# --- module-level errors ---------------------------------------------------------------------


def test_module_errors():
    layer = ATMLayer(C)
    x = torch.randn(1, 3, 4, C)
    with pytest.raises(ValueError, match="offset"):
        layer(x, torch.randn(1, C, 3, 4))
    with pytest.raises(ValueError, match="offset"):
        layer(x, torch.randn(1, 3, 4, 2 * C))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(1, 3, 4, C + 1), torch.randn(1, 2 * C + 2, 3, 4))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 4, C), torch.randn(1, 2 * C, 3, 4))
    with pytest.raises(ValueError, match="share"):
        layer.forward_compact(x, torch.randn(1, 3, 4, 3), torch.randn(1, 3, 4, 3), share=3)

    nchw = torch.randn(1, C, 3, 4)
    with pytest.raises(ValueError, match="dimension"):
        ATMOp(C, C)(nchw, nchw)
    with pytest.raises(ValueError, match="stride"):
        ATMOp(C, C, stride=2, dimension="h")(nchw, nchw)
    with pytest.raises(ValueError, match="padding"):
        ATMOp(C, C, padding=1, dimension="h")(nchw, nchw)
    with pytest.raises(ValueError, match="input"):
        ATMOp(C + 1, C, dimension="h")(nchw, nchw)
    with pytest.raises(ValueError, match="offset"):
        ATMOp(C, C, dimension="w")(nchw, nchw[:, :, :2])

    with pytest.raises(ValueError, match="offset"):
        ActiveBlock(C)(x)
