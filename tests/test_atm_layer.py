"""The fused ATMLayer path (``mixops.ops.atm_layer``, ``kernels/atm_layer.py``): the internal
ops ``mixops::_atm_means`` / ``mixops::_atm_mix`` against the float64 reference (forward and
every gradient, every offset distribution and share, awkward sizes, both dalpha strategies),
canary buffers, gradcheck, opcheck, determinism; ATMLayer and ActiveBlock with a random
state_dict loaded against the official forward; the unfused fallback; the block heuristics;
an sm_90 build of the new kernels; ``needs_cuda`` GPU tests.

On CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import mixops  # noqa: E402
from mixops.kernels import atm_layer as KL  # noqa: E402
from mixops.kernels import _reweighted_mix as RM  # noqa: E402
from mixops.kernels._common import SPLIT_TARGET_PROGRAMS, Blocks, deterministic_split, dot_dtypes  # noqa: E402
from mixops.nn.atm import ActiveBlock, ATMLayer  # noqa: E402
from mixops.ops import atm_layer as OL  # noqa: E402
from mixops.reference import atm as R  # noqa: E402
import sm90_compile  # noqa: E402
from mixops_testing import assert_close, only_backends, skip_unless_runs  # noqa: E402
from test_atm_cases import KINDS, away_from_integers, make_offset  # noqa: E402
from test_atm_triton import _PTR, _STAGES, _canary, _untouched, set_interpreting, warps_per_sm  # noqa: E402

MIX_INPUTS = ("x", "offset_w", "offset_h", "weight_w", "weight_h", "weight_c", "bias_w", "bias_h", "alpha")
NAN = float("nan")


def _offsets(kind, shape, share, dtype):
    B, H, W, C = shape
    g = (B, H, W, C // share)
    return make_offset(kind, g, "w").to(dtype), make_offset(kind, g, "h").to(dtype)


def _mix_inputs(shape, share, kind="normal1", dtype=torch.float64, c_out=None, device="cpu"):
    """x as a channels-last view of NCHW storage, transposed weights, strided biases, alpha as
    a permuted view: the kernels must go by strides."""
    B, H, W, C = shape
    c_out = c_out or C
    x = torch.randn(B, C, H, W, dtype=torch.float64).to(dtype).permute(0, 2, 3, 1)
    ow, oh = _offsets(kind, shape, share, dtype)
    ws = [(torch.randn(C, c_out, dtype=torch.float64) * 0.3).to(dtype).t() for _ in range(3)]
    bw, bh = (torch.randn(2 * c_out, dtype=torch.float64).to(dtype)[::2] for _ in range(2))
    alpha = torch.randn(B, 3, c_out, dtype=torch.float64).softmax(dim=1).to(dtype).permute(0, 2, 1)
    return [t.to(device) for t in (x, ow, oh, *ws, bw, bh, alpha)]


def _reference_mix(inputs, g, share):
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out = R.atm_mix(*leaves, share)
    return out.detach(), torch.autograd.grad(out, leaves, g.double().cpu())


def _reference_means(inputs, g, share):
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out = R.atm_means(*leaves, share)
    return out.detach(), torch.autograd.grad(out, leaves, g.double().cpu())


# --- the internal ops against the float64 reference --------------------------------------------

# (B, H, W, C, share): C > H·W (dalpha from the recomputed branch outputs) and C <= H·W (from
# the per-sample GEMM P_b = dY_b^T S_b), nothing a multiple of a block, every share
CASES = [(2, 3, 5, 24, 1), (2, 3, 5, 24, 8), (3, 5, 7, 12, 2), (2, 7, 6, 16, 4), (1, 1, 9, 8, 2)]


@pytest.mark.op("_atm_mix")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_mix_forward_and_gradients(case, kind, backend):
    skip_unless_runs("_atm_mix", backend, "cpu")
    *shape, share = case
    dtype = torch.float64 if (len(kind) + shape[-1]) % 2 else torch.float32  # both, cheaply
    inputs = _mix_inputs(shape, share, kind, dtype)
    g = torch.randn(shape[0], 1, shape[2], shape[3], dtype=torch.float64).to(dtype).expand(shape)
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = OL.atm_mix(*leaves, share, backend=backend)
    got = torch.autograd.grad(out, leaves, g)
    ref, want = _reference_mix(inputs, g, share)
    assert_close(out, ref, dtype, name="mix")
    for name, a, e in zip(MIX_INPUTS, got, want):
        assert a.dtype == dtype
        assert_close(a, e, dtype, name=f"grad {name}")


@pytest.mark.op("_atm_means")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_means_forward_and_gradients(case, kind, backend):
    skip_unless_runs("_atm_means", backend, "cpu")
    *shape, share = case
    dtype = torch.float64 if (len(kind) + shape[-1]) % 2 else torch.float32
    x, ow, oh, *_ = _mix_inputs(shape, share, kind, dtype)
    g = torch.randn(shape[0], 3, 1, dtype=torch.float64).expand(shape[0], 3, shape[-1])
    leaves = [t.detach().requires_grad_() for t in (x, ow, oh)]
    out = OL.atm_means(*leaves, share, backend=backend)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    got = torch.autograd.grad(out, leaves, g.to(out.dtype))
    ref, want = _reference_means((x, ow, oh), g, share)
    assert_close(out, ref, dtype, name="means")
    for name, a, e in zip(("x", "offset_w", "offset_h"), got, want):
        assert_close(a, e, dtype, name=f"grad {name}")


def test_both_dalpha_strategies_are_exercised():
    assert RM.alpha_grad_by_identity(8, 9) and RM.alpha_grad_by_identity(12, 35)
    assert not RM.alpha_grad_by_identity(24, 15)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("identity", [True, False])
def test_mix_backward_needs_subsets_and_bits(monkeypatch, identity):
    """Each gradient alone gives the same bits as all of them; two runs are bit-identical;
    no bias means no bias gradients."""
    monkeypatch.setattr(RM, "alpha_grad_by_identity", lambda c, p: identity)
    shape, share = (2, 4, 5, 12), 4
    inputs = _mix_inputs(shape, share, "normal5", torch.float32)
    g = torch.randn(shape)
    every = KL.mix_backward([g], [True] * 9, *inputs, share)
    again = KL.mix_backward([g], [True] * 9, *inputs, share)
    assert all(torch.equal(a, b) for a, b in zip(every, again))
    _, want = _reference_mix(inputs, g, share)
    for name, a, e in zip(MIX_INPUTS, every, want):
        assert_close(a, e, torch.float32, name=f"grad {name}")
    for i in range(9):
        (only,) = KL.mix_backward([g], [j == i for j in range(9)], *inputs, share)
        assert torch.equal(only, every[i]), MIX_INPUTS[i]
    no_bias = [*inputs[:6], None, None, inputs[8]]
    got = KL.mix_backward([g], [True] * 6 + [False, False, True], *no_bias, share)
    _, want = _reference_mix([*inputs[:6], torch.zeros_like(inputs[6]), torch.zeros_like(inputs[7]), inputs[8]], g, share)
    for name, a, e in zip(MIX_INPUTS[:6] + ("alpha",), got, [*want[:6], want[8]]):
        assert_close(a, e, torch.float32, name=f"grad {name} (no bias)")


@pytest.fixture
def interpreted():
    skip_unless_runs("_atm_mix", "triton", "cpu")


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("c_out", [7, 19])
@pytest.mark.parametrize("small_tiles", [False, True])
def test_mix_writes_exactly_its_output(monkeypatch, small_tiles, c_out):
    """A NaN canary around a strided output; C_out != C; 16 x 16 x 16 tiles give several row,
    column and reduction blocks with ragged edges, rows spanning two images."""
    if small_tiles:
        monkeypatch.setattr(RM, "mix_blocks", lambda *a: Blocks(m=16, n=16, k=16, num_warps=4, num_stages=1))
    shape, share = (3, 5, 3, 24), 2
    inputs = _mix_inputs(shape, share, "edges", torch.float64, c_out=c_out)
    buf, out, inside = _canary((*shape[:3], c_out), torch.float64)
    RM.launch_mix((inputs[0],) * 3, tuple(inputs[1:3]), tuple(inputs[3:6]), (inputs[6], inputs[7], None), inputs[8], out,
                  share)
    _untouched(buf, inside, "out")
    assert_close(out, R.atm_mix(*inputs, share), name="mix")
    buf, out, inside = _canary((*shape[:3], c_out), torch.float64)
    RM.launch_mix((inputs[0],) * 3, tuple(inputs[1:3]), tuple(inputs[3:6]), (None,) * 3, inputs[8], out, share)
    _untouched(buf, inside, "out (no bias)")
    assert_close(out, R.atm_mix(*inputs[:6], None, None, inputs[8], share), name="mix (no bias)")


@pytest.mark.usefixtures("interpreted")
def test_means_split_over_pixels(monkeypatch):
    """SPLIT > 1 (the GPU's pixel split), small channel tiles: the same means."""
    monkeypatch.setattr(KL, "means_blocks", lambda *a: KL.MeansBlocks(m=4, c=8, split=3, num_warps=4))
    shape, share = (2, 5, 7, 12), 4
    x, ow, oh, *_ = _mix_inputs(shape, share, "normal5")
    part = KL.launch_means(x, ow, oh, share)
    assert part.shape == (2, 3, 3, 12)
    assert_close(part.sum(dim=1) / 35, R.atm_means(x, ow, oh, share), name="means")


@pytest.mark.usefixtures("interpreted")
def test_half_storage():
    """fp16 under the interpreter (bf16 only on the GPU): fp32 positions and accumulation."""
    shape, share = (2, 5, 6, 16), 2
    inputs = _mix_inputs(shape, share, "normal1", torch.float16)
    g = torch.randn(shape).half()
    ref, want = _reference_mix(inputs, g, share)
    assert_close(KL.mix_forward(*inputs, share), ref, torch.float16, name="mix fp16")
    for name, a, e in zip(MIX_INPUTS, KL.mix_backward([g], [True] * 9, *inputs, share), want):
        assert_close(a, e, torch.float16, name=f"grad {name} fp16")
    means = KL.means_forward(*inputs[:3], share)
    assert means.dtype == torch.float32
    assert_close(means, R.atm_means(*(t.double() for t in inputs[:3]), share), torch.float16, name="means fp16")


# --- gradcheck, opcheck ------------------------------------------------------------------------


def _tiny(share=2):
    shape = (2, 3, 4, 4)
    inputs = _mix_inputs(shape, share)
    g = (2, 3, 4, 4 // share)
    inputs[1], inputs[2] = away_from_integers(g), away_from_integers(g)
    return [t.detach().requires_grad_() for t in inputs], share


@pytest.mark.op("_atm_mix")
def test_mix_gradcheck(backend):
    skip_unless_runs("_atm_mix", backend, "cpu")
    inputs, share = _tiny()
    assert torch.autograd.gradcheck(lambda *a: OL.atm_mix(*a, share, backend=backend), inputs, fast_mode=True)


@pytest.mark.op("_atm_means")
def test_means_gradcheck(backend):
    skip_unless_runs("_atm_means", backend, "cpu")
    inputs, share = _tiny()
    assert torch.autograd.gradcheck(
        lambda *a: OL.atm_means(*a, share, backend=backend), inputs[:3], fast_mode=True
    )


@pytest.mark.op("_atm_mix")
@pytest.mark.parametrize("with_bias", [True, False])
def test_mix_opcheck(with_bias, backend):
    skip_unless_runs("_atm_mix", backend, "cpu")
    inputs, share = _tiny(4)
    if not with_bias:
        inputs[6] = inputs[7] = None
    torch.library.opcheck(torch.ops.mixops._atm_mix.default, (*inputs, share, backend))


@pytest.mark.op("_atm_means")
def test_means_opcheck(backend):
    skip_unless_runs("_atm_means", backend, "cpu")
    inputs, share = _tiny(1)
    torch.library.opcheck(torch.ops.mixops._atm_means.default, (*inputs[:3], share, backend))


# --- the fused module against the official forward ---------------------------------------------


def _random_state(module, std=0.3):
    return {k: torch.randn(v.shape, dtype=torch.float64) * std for k, v in module.state_dict().items()}


def _no_unfused_path(monkeypatch):
    """The fused path must not call the per-branch atm_fc."""
    def fail(*a, **k):
        raise AssertionError("the unfused atm_fc path ran")
    monkeypatch.setattr("mixops.nn.atm.atm_fc", fail)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 5, 6, 8), (3, 3, 5, 12)], ids=str)
def test_fused_atm_layer_matches_official(monkeypatch, shape, dtype):
    _no_unfused_path(monkeypatch)
    B, H, W, C = shape
    m = ATMLayer(C)
    m.load_state_dict(_random_state(m), strict=True)
    m = m.to(dtype)
    x = torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_()
    offset = (torch.randn(B, H, W, 2 * C, dtype=torch.float64) * 2).to(dtype).permute(0, 3, 1, 2).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    leaves = [x, offset, *m.parameters()]
    with mixops.use_backend("triton"):
        out = m(x, offset)
        got = torch.autograd.grad(out, leaves, g)
    m64 = ATMLayer(C).double()
    m64.load_state_dict(m.state_dict())
    x64, off64 = x.detach().double().requires_grad_(), offset.detach().double().requires_grad_()
    ref = R.atm_layer_forward(m64, x64, off64)
    want = torch.autograd.grad(ref, [x64, off64, *m64.parameters()], g.double())
    assert_close(out, ref, dtype, name="ATMLayer")
    for name, a, e in zip(["x", "offset"] + [n for n, _ in m.named_parameters()], got, want):
        assert_close(a, e, dtype, name=f"grad {name}")


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("share", [2, 4])
def test_fused_active_block_matches_official(monkeypatch, share):
    _no_unfused_path(monkeypatch)
    C = 8
    blk = ActiveBlock(C, share_dim=share, new_offset=True)
    blk.load_state_dict(_random_state(blk), strict=True)
    blk = blk.double()
    x = torch.randn(2, 4, 5, C, dtype=torch.float64, requires_grad=True)
    with mixops.use_backend("triton"):
        out, off = blk(x)
        leaves = [x, *blk.parameters()]
        g, go = torch.randn_like(out), torch.randn_like(off)
        got = torch.autograd.grad((out * g).sum() + (off * go).sum(), leaves)
    ref_out, ref_off = R.active_block_forward(blk, x)
    want = torch.autograd.grad((ref_out * g).sum() + (ref_off * go).sum(), leaves)
    assert_close(out, ref_out, name="ActiveBlock")
    for name, a, e in zip(["x"] + [n for n, _ in blk.named_parameters()], got, want):
        assert_close(a, e, name=f"grad {name}")


@pytest.mark.usefixtures("interpreted")
def test_fused_layer_backward_is_bit_identical():
    C = 12
    m = ATMLayer(C)
    m.load_state_dict(_random_state(m))
    x = torch.randn(2, 5, 6, C, requires_grad=True)
    offset = torch.randint(-3, 4, (2, 2 * C, 5, 6)).float().requires_grad_()  # colliding samples
    leaves = [x, offset, *m.parameters()]
    with mixops.use_backend("triton"):
        runs = [torch.autograd.grad(m(x, offset).square().sum(), leaves) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fused_path_choice(monkeypatch):
    """The fused path follows atm_fc's backend; a backend without the internal ops (simulated:
    only torch has _atm_mix) keeps the unfused path, which still goes through that backend."""
    x = torch.randn(1, 3, 4, 8)
    with mixops.use_backend("torch"):
        assert OL.fused_backend(x) == "torch"
    assert OL.fused_backend(x) == "torch"  # auto on CPU
    if mixops.available_backends("atm_fc") == ("torch",):
        return
    with mixops.use_backend("triton"):
        assert OL.fused_backend(x) == "triton"
    only_backends(monkeypatch, "_atm_mix", "torch")
    m = ATMLayer(8).double()
    x = x.double()
    offset = torch.randn(1, 16, 3, 4, dtype=torch.float64)
    calls = []
    real = mixops.nn.atm.atm_fc
    monkeypatch.setattr("mixops.nn.atm.atm_fc", lambda *a, **k: calls.append(k) or real(*a, **k))
    with mixops.use_backend("triton"):
        assert OL.fused_backend(x) is None
        out = m(x, offset)
    assert len(calls) == 2
    assert_close(out, R.atm_layer_forward(m, x, offset), name="unfused ATMLayer")


def test_fused_path_errors():
    m = ATMLayer(8)
    x = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="offset"):
        m.forward_compact(x, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 2), share=2)
    with pytest.raises(TypeError, match="offset"):
        m.forward_compact(x, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4).double(), share=2)


# --- block heuristics ----------------------------------------------------------------------------


def _is_pow2(v):
    return v >= 1 and v & (v - 1) == 0


@pytest.mark.parametrize("interpreting", [True, False])
def test_block_heuristics(monkeypatch, interpreting):
    set_interpreting(monkeypatch, interpreting)
    for B in (1, 2, 37, 128):
        for n, C, _ in _STAGES + [(3, 12, 2), (1, 1, 1)]:
            cfg = KL.means_blocks(B, n * n, C)
            assert _is_pow2(cfg.m) and _is_pow2(cfg.c) and cfg.split >= 1
            assert (cfg.split - 1) * cfg.m < n * n  # no program without pixels
            # the shapes alone decide the split, and column_sum's partials stay <= 256 per output
            assert cfg.split == deterministic_split(n * n, cfg.m, B * triton.cdiv(C, cfg.c)) <= SPLIT_TARGET_PROGRAMS
            for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                mix = RM.mix_blocks(B * n * n, C, C, dtype)
                assert all(_is_pow2(t) and t >= 16 for t in (mix.m, mix.n, mix.k))
    if not interpreting:
        # C = 320 (ActiveMLP-T stage 3): channel tiles that divide it, or (fp16/bf16) 128-wide
        # column tiles: 3 gathers of each A tile rather than 5
        assert 320 % KL.means_blocks(128, 196, 320).c == 0
        assert 320 % RM.mix_blocks(128 * 196, 320, 320, torch.float32).n == 0
        for C in (64, 128, 320, 512):
            assert RM.mix_blocks(128 * 196, C, C, torch.bfloat16).n == min(triton.next_power_of_2(C), 128)


# --- the new kernels compile for sm_90 without spills -------------------------------------------

_BUILDS = {
    **{f"means-{d}": ("means", d, _STAGES[0], None) for d in _PTR},
    "means-bf16-n320": ("means", "bf16", _STAGES[2], None),
    **{f"mix-{d}": ("mix", d, _STAGES[0], (True, False)) for d in _PTR},
    **{f"mix-{d}-n320": ("mix", d, _STAGES[2], (True, False)) for d in ("fp16", "bf16")},
    **{f"mix-{d}-n512": ("mix", d, _STAGES[3], (True, False)) for d in _PTR},
    "mix-fp32-tf32": ("mix", "fp32", _STAGES[2], (True, True)),
    "mix-bf16-nobias": ("mix", "bf16", _STAGES[3], (False, False)),
}


def _arg_values(fn, dtype, stage, ptr):
    """The runtime arguments of a launch on ActiveBlock's tensors at a stage, for
    sm90_compile.jit_signature: x and out contiguous [128, n, n, C], the two offsets the halves
    of one [128, n, n, 2G] tensor (as forward_compact gets them), contiguous weights and
    biases, alpha contiguous [128, C, 3]."""
    n, C, share = stage
    G = C // share
    values = dict(M=128 * n * n, H=n, W=n, C=C, C_OUT=C, SPLIT=1, s_b0=1, s_b1=1, s_b2=0, sa_b=3 * C, sa_n=3,
                  sa_k=1)  # fmt: skip
    maps = (n * n * C, n * C, C, 1)
    offsets = (n * n * 2 * G, n * 2 * G, 2 * G, 1)
    for prefix, t in (("sx", maps), ("sf0", maps), ("sf1", maps), ("sf2", maps), ("sy", maps),
                      ("sow", offsets), ("soh", offsets), ("so0", offsets), ("so1", offsets)):  # fmt: skip
        last = "g" if prefix.startswith("so") else "c"
        values.update(zip((f"{prefix}_b", f"{prefix}_h", f"{prefix}_w", f"{prefix}_{last}"), t))
    for w in ("sw0", "sw1", "sw2"):
        values.update({f"{w}_n": C, f"{w}_k": 1})
    values.update({name: ptr.get(name, _PTR[dtype]) for name in fn.arg_names if name.endswith("_ptr")})
    return values


def _build(kernel, dtype, stage, needs):
    n, C, share = stage
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}[dtype]
    compute = tl.float64 if dtype == "fp64" else tl.float32
    if kernel == "means":
        fn, cfg = KL._atm_means_kernel, KL.means_blocks(128, n * n, C)
        consts = dict(SHARE=share, COMPUTE=compute, BLOCK_M=cfg.m, BLOCK_C=cfg.c)
        options = dict(num_warps=cfg.num_warps)
        ptr = {"part_ptr": "*fp64" if dtype == "fp64" else "*fp32"}
    else:
        fn, cfg = RM._reweighted_mix_kernel, RM.mix_blocks(128 * n * n, C, C, torch_dtype)
        has_bias, tf32 = needs
        dot_dtype, _, precision = dot_dtypes(torch_dtype)
        consts = dict(SHARE=share, GATHER=True, HAS_B0=has_bias, HAS_B1=has_bias, HAS_B2=False, COMPUTE=compute,
                      DOT_DTYPE=dot_dtype,
                      PRECISION="tf32" if tf32 else precision, IDX64=False, BLOCK_M=cfg.m, BLOCK_N=cfg.n,
                      BLOCK_K=cfg.k)
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ptr = {}
    signature, consts, attrs = sm90_compile.jit_signature(fn, _arg_values(fn, dtype, stage, ptr), consts)
    return sm90_compile.compile_sm90(fn, signature, consts, options, attrs, cfg=dataclasses.asdict(cfg))


def _build_all():
    """Child-process entry point (sm90_compile.run_builds)."""
    sm90_compile.build_all(_BUILDS, _build)


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_compile.run_builds("test_atm_layer", timeout=900)


@pytest.mark.parametrize("build", list(_BUILDS))
def test_kernel_compiles_for_sm90(sm90_builds, build):
    sm90_compile.assert_built(sm90_builds[build])


@pytest.mark.parametrize("build", [b for b in _BUILDS if b.startswith("mix-") and "fp64" not in b])
def test_mix_builds_hold_16_warps_per_sm(sm90_builds, build):
    """The mix kernel's branches one after the other leave 16 warps per SM (the three
    accumulators and two gathers before them: 8, at 185-253 registers for 8 warps)."""
    got = sm90_builds[build]
    assert warps_per_sm(got) >= 16, (got["registers"], got["cfg"])


# --- GPU ---------------------------------------------------------------------------------------

_GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_without(gpu_backend: str) -> None:
    if gpu_backend not in mixops.available_backends("_atm_mix"):
        pytest.skip(f"no {gpu_backend} backend here")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=str)
@pytest.mark.parametrize("stage", _STAGES, ids=str)
def test_cuda_internal_ops_match_reference(stage, dtype, gpu_backend):
    _skip_without(gpu_backend)
    n, C, share = stage
    shape = (4, n, n, C)
    inputs = _mix_inputs(shape, share, "normal5", dtype, device="cuda")
    g = torch.randn(shape, dtype=torch.float64).to(dtype).cuda()
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = OL.atm_mix(*leaves, share, backend=gpu_backend)
    got = torch.autograd.grad(out, leaves, g)
    ref, want = _reference_mix(inputs, g, share)
    assert_close(out, ref, dtype, name="mix")
    for name, a, e in zip(MIX_INPUTS, got, want):
        assert_close(a, e, dtype, name=f"grad {name}")
    gm = torch.randn(4, 3, C, device="cuda")
    means = OL.atm_means(*leaves[:3], share, backend=gpu_backend)
    got = torch.autograd.grad(means, leaves[:3], gm)
    ref, want = _reference_means(inputs[:3], gm, share)
    assert_close(means, ref, dtype, name="means")
    for name, a, e in zip(MIX_INPUTS[:3], got, want):
        assert_close(a, e, dtype, name=f"means grad {name}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("gpu_backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=str)
def test_cuda_fused_layer_matches_official(dtype, gpu_backend):
    _skip_without(gpu_backend)
    B, n, C, share = 8, 14, 320, 4
    m = ATMLayer(C).cuda()
    m.load_state_dict({k: v.cuda() for k, v in _random_state(m, 0.05).items()})
    m = m.to(dtype)
    x = torch.randn(B, n, n, C, device="cuda").to(dtype).requires_grad_()
    o = (torch.randn(B, n, n, 2 * C // share, device="cuda") * 3).to(dtype).requires_grad_()
    G = C // share
    g = torch.randn(B, n, n, C, device="cuda").to(dtype)
    leaves = [x, o, *m.parameters()]
    with mixops.use_backend(gpu_backend):
        assert OL.fused_backend(x) == gpu_backend
        out = m.forward_compact(x, o[..., :G], o[..., G:], share=share)
        got = torch.autograd.grad(out, leaves, g)
    m64 = ATMLayer(C).double()
    m64.load_state_dict({k: v.double().cpu() for k, v in m.state_dict().items()})
    x64, o64 = x.detach().double().cpu().requires_grad_(), o.detach().double().cpu().requires_grad_()
    ref = R.atm_layer_forward(m64, x64, o64.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2))
    want = torch.autograd.grad(ref, [x64, o64, *m64.parameters()], g.double().cpu())
    assert_close(out, ref, dtype, name="ATMLayer")
    for name, a, e in zip(["x", "offset"] + [k for k, _ in m.named_parameters()], got, want):
        assert_close(a, e, dtype, name=f"grad {name}")
    with mixops.use_backend(gpu_backend):
        again = torch.autograd.grad(m.forward_compact(x, o[..., :G], o[..., G:], share=share), leaves, g)
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "backward is not bit-identical"
