"""The Triton kernels of ``dynamixer_mix`` (kernels/dynamixer.py) beyond the op tests every
backend runs (tests/test_dynamixer_op.py): awkward shapes that take every padding and blocking
path (several q-blocks and l-blocks, S = 1, d = 1 and 4, C/S not a power of two), the official
shapes, outputs written exactly where they belong (NaN canaries), the fixed-range split of the
GPU, bit-for-bit determinism, the tile rule. All against the float64 reference, forward and
every gradient; on CPU tensors under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.reference import dynamixer as ref
from mixops_testing import assert_close, skip_unless_runs
from test_dynamixer_op import ARG_NAMES, make_inputs

K = pytest.importorskip("mixops.kernels.dynamixer")
WG = pytest.importorskip("mixops.kernels._weight_grad")

NAN = float("nan")

# (B', N, C, S, d): N = 17 and 20 (two q-blocks, padded to 32), N = 32 (four l-blocks of the
# dWg kernel at d = 2), S = 1 with d = 1, d = 4, E = 3, 5 and 24 (C/S not a power of two)
AWKWARD = [(3, 17, 15, 5, 3), (2, 32, 16, 2, 2), (5, 7, 24, 1, 1), (3, 20, 40, 8, 4), (2, 9, 48, 2, 1)]
# DynaMixer-S stage 1 and stages 2-4, DynaMixer-L stages 2-4 (d = 8), B' = 2 (docs/dynamixer.md 7)
OFFICIAL = [(2, 32, 192, 8, 2), (2, 16, 384, 16, 2), (1, 16, 512, 16, 8)]
TOL_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def triton_runs(request):
    """The CPU tests need the interpreter, the GPU ones a GPU."""
    skip_unless_runs("dynamixer_mix", "triton", "cuda" if request.node.get_closest_marker("needs_cuda") else "cpu")


def _check(shape, dtype, name="", device="cpu"):
    """Forward and all five gradients of the triton backend against the float64 reference
    evaluated on the same (rounded) inputs."""
    *_, s, d = shape
    inputs = [t.requires_grad_() for t in make_inputs(*shape, dtype=dtype, device=device)]
    out = mixops.dynamixer_mix(*inputs, num_head=s, reduced_dim=d, backend="triton")
    grad_out = torch.randn(out.shape, dtype=dtype, device=device)
    got = torch.autograd.grad(out, inputs, grad_out)
    exact = [t.detach().cpu().double().requires_grad_() for t in inputs]
    want_out = ref.dynamixer_mix(*exact, s, d)
    want = torch.autograd.grad(want_out, exact, grad_out.cpu().double())
    assert_close(out, want_out, dtype=dtype, name=f"{name} output")
    for arg, g, w in zip(ARG_NAMES, got, want):
        assert g.dtype == dtype
        assert_close(g, w, dtype=dtype, name=f"{name} grad {arg}")


@pytest.mark.parametrize("dtype", TOL_DTYPES)
@pytest.mark.parametrize("shape", AWKWARD)
def test_awkward_shapes_forward_and_backward(shape, dtype):
    _check(shape, dtype, str(shape))


@pytest.mark.slow
@pytest.mark.parametrize("shape", OFFICIAL)
def test_official_shapes_forward_and_backward(shape):
    _check(shape, torch.float32, str(shape))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", AWKWARD + [(128 * s[0], *s[1:]) for s in OFFICIAL])
def test_gpu_forward_and_backward(shape, dtype):
    """On the GPU: the awkward shapes, and the official ones with 128 times the sequences (many
    programs, the GPU's split of generate's gradients into fixed ranges)."""
    _check(shape, dtype, str(shape), device="cuda")


def test_tiles_obey_the_dot_and_register_rules():
    for N in (1, 5, 16, 17, 32, 64):
        for S in (1, 3, 8, 16):
            for E in (1, 24, 32):
                for d in (1, 2, 4, 8):
                    t = K.dynamixer_tiles(N, S, E, d)
                    assert t.np >= max(N, 16) and t.sp >= S and t.ep >= max(E, 16) and t.dp >= d
                    # every tl.dot dimension is >= 16: generate (BB*SP, NP*DP, NP*QB), the mixing
                    # (QB, NP, EP), compress (BB*NP, EP, SP*DP), dWg (NP*QB, BB*SP, LB*DP)
                    assert min(t.bb * t.sp, t.np * t.dp, t.np * t.qb, t.qb, t.sp * t.dp, t.lb * t.dp) >= 16
                    assert t.np % t.lb == 0 and t.lb >= 1 and t.ep % t.eb == 0 and t.eb >= 16
                    # dWg's register block stays at 8K values unless the 16-wide dot forces more
                    assert t.np * t.qb * t.lb * t.dp <= max(8192, t.np * t.qb * 16)


def _canary(shape, dtype):
    """A strided view of the given shape inside a NaN buffer, and the mask of the view."""
    buf = torch.full((shape[0] + 1, *(n + 2 for n in shape[1:-1]), shape[-1] + 5), NAN, dtype=dtype)
    inside = torch.zeros(buf.shape, dtype=torch.bool)
    index = (slice(1, None), *(slice(1, n + 1) for n in shape[1:-1]), slice(2, shape[-1] + 2))
    inside[index] = True
    return buf, buf[index], inside


# (x shape, S, d, axis): the public op's [B', N, C] (axis None) and the block's columns ("h")
CANARY_CASES = [((3, 17, 15), 5, 3, None), ((2, 6, 8), 4, 2, None), ((2, 5, 3, 12), 3, 2, "h")]


@pytest.mark.parametrize("shape, s, d, axis", CANARY_CASES)
def test_outputs_written_exactly(shape, s, d, axis):
    """y, dx and dr into strided views of NaN buffers (dx is also read back by the kernel, to
    add compress's share): nothing outside is written, the values inside are right."""
    n = shape[1] if axis is not None else shape[-2]
    x, *params = make_inputs(1, n, shape[-1], s, d)
    x = torch.randn(shape, dtype=torch.float64)
    inputs = [x, *params]
    seq = (lambda t: K.sequences(t, axis))
    mix = ref.dynamixer_mix if axis is None else (lambda *a: ref.dynamixer_axis_mix(*a, axis))
    buf, y, inside = _canary(shape, torch.float64)
    K.launch_forward(seq(x), *params, seq(y), s, d)
    assert buf[~inside].isnan().all(), "forward wrote outside y"
    assert_close(y, mix(*inputs, s, d), name="y")

    exact = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(shape, dtype=torch.float64)
    want = torch.autograd.grad(mix(*exact, s, d), exact, dy)
    buf, dx, inside = _canary(shape, torch.float64)
    dr_buf, dr, dr_inside = _canary((*shape[:-1], s * d), torch.float64)
    K.launch_mix_backward(seq(x), *params, seq(dy), seq(dx), seq(dr), s, d)
    assert buf[~inside].isnan().all(), "backward wrote outside dx"
    assert dr_buf[~dr_inside].isnan().all(), "backward wrote outside dr"
    assert_close(dx, want[0], name="dx")
    # dr is compress's output gradient, in x's token order: its Linear backward gives the
    # compress gradients
    rows = (shape[0], -1)
    dcw, dcb = WG.linear_param_grads(dr.reshape(*rows, s * d), x.reshape(*rows, shape[-1]), True, True)
    assert_close(dcw, want[1], name="compress_weight grad from dr")
    assert_close(dcb, want[2], name="compress_bias grad from dr")


def test_fixed_range_split(monkeypatch):
    """The GPU's split into fixed ranges of sequence tiles (several per program, strided) and
    of rows for the compress gradients: the same gradients as one range."""
    shape = (7, 9, 12, 2, 2)  # with the tiles below: 4 tiles of 2 sequences in 3 ranges, 8 l-blocks
    *_, s, d = shape
    inputs = [t.requires_grad_() for t in make_inputs(*shape)]
    dy = torch.randn(shape[:3], dtype=torch.float64)
    want = torch.autograd.grad(ref.dynamixer_mix(*inputs, s, d), inputs, dy)
    monkeypatch.setattr(K, "deterministic_split", lambda length, step, tiles: min(3, length))
    monkeypatch.setattr(WG, "deterministic_split", lambda length, step, tiles: 3)
    monkeypatch.setattr(K, "dynamixer_tiles", lambda *a: K.Tiles(bb=2, sp=2, np=16, dp=8, ep=16, qb=16, lb=2,
                                                                  eb=16, num_warps=4))
    got = torch.autograd.grad(mixops.dynamixer_mix(*inputs, num_head=s, reduced_dim=d, backend="triton"), inputs, dy)
    for arg, g, w in zip(ARG_NAMES, got, want):
        assert_close(g, w, name=f"grad {arg}")


def test_generate_gradient_alone_and_bias_alone():
    """Each of generate's two gradients asked for without the other (and without x's)."""
    shape = (3, 17, 15, 5, 3)
    *_, s, d = shape
    inputs = make_inputs(*shape)
    dy = torch.randn(shape[:3], dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(ref.dynamixer_mix(*exact, s, d), exact, dy)
    for needs, wanted in (([False] * 3 + [True, False], [want[3]]), ([False] * 4 + [True], [want[4]]),
                          ([False, True, False, False, False], [want[1]])):
        got = K.backward([dy], needs, *inputs, s, d)
        assert len(got) == len(wanted)
        for g, w in zip(got, wanted):
            assert_close(g, w)


def test_bf16_bit_for_bit_deterministic():
    shape = (3, 20, 40, 8, 4)
    *_, s, d = shape
    inputs = [t.requires_grad_() for t in make_inputs(*shape, dtype=torch.bfloat16)]
    dy = torch.randn(shape[:3], dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = mixops.dynamixer_mix(*inputs, num_head=s, reduced_dim=d, backend="triton")
        runs.append((out, *torch.autograd.grad(out, inputs, dy)))
    for name, a, b in zip(("output", *ARG_NAMES), *runs):
        assert torch.equal(a, b), name
