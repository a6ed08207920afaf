"""The Triton kernels of ``partition_fc`` (kernels/repmlp.py) beyond the op tests every backend
runs (tests/test_repmlp_ops.py): several row and column tiles and split-M ranges per share-set
(the dgate partials of several column tiles, the bias term counted once), outputs written
exactly where they belong (NaN canaries), each gradient alone, bit-for-bit determinism, the
pixel-run rule; GPU tests at RepMLPNet's shapes. All against the float64 reference; on CPU
tensors under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

import mixops
from mixops.reference import repmlp as ref
from mixops_testing import assert_close, skip_unless_runs

K = pytest.importorskip("mixops.kernels.repmlp")
from mixops.kernels._common import Blocks  # noqa: E402

OP = "partition_fc"
F64 = torch.float64
NAN = float("nan")


@pytest.fixture(autouse=True)
def triton_runs(request):
    """The CPU tests need the interpreter, the GPU ones a GPU."""
    skip_unless_runs(OP, "triton", "cuda" if request.node.get_closest_marker("needs_cuda") else "cpu")


def _inputs(N, C, S, h, w, H, W, dtype=F64, device="cpu"):
    hw = h * w
    t = dict(dtype=dtype, device=device)
    return (torch.randn(N, C, H, W, **t), (torch.randn(S * hw, hw, 1, 1, **t) / hw**0.5).to(dtype),
            torch.randn(S * hw, **t), torch.rand(N, C, **t) + 0.5)  # fmt: skip


def _reference(x, weight, bias, gate, partition, S, g):
    """(out, [dx, dweight, dbias, dgate]) of the float64 reference."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, weight, bias, gate)]
    out = ref.partition_fc(*leaves, partition, S)
    return out, list(torch.autograd.grad(out, leaves, g.cpu().double()))


SMALL = Blocks(m=16, n=16, k=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("case", [(3, 8, 2, 4, 5, 8, 10), (6, 24, 3, 5, 4, 5, 4)], ids=["scrambled", "native"])
def test_many_tiles_and_split_ranges(monkeypatch, case):
    """16 x 16 tiles and three row ranges of the 48 rows per share-set: hw = 20 spans two
    column tiles (dgate adds the partials of both, the dOut . b term once), rows of one tile
    span images and partitions."""
    monkeypatch.setattr(K, "gemm_blocks", lambda M, hw, dtype: SMALL)
    monkeypatch.setattr(K, "weight_grad_blocks", lambda M, hw, dtype: SMALL)
    monkeypatch.setattr(K, "deterministic_split", lambda length, step, tiles: 3)
    N, C, S, h, w, H, W = case
    x, weight, bias, gate = _inputs(*case)
    geo = K.geometry(x.shape, (h, w), S)
    assert K.weight_grad_split(geo, F64) == 3 and K.dgate_partials(geo, F64, "cpu").shape[0] == 2
    g = torch.randn(x.shape, dtype=F64)
    want_out, want = _reference(x, weight, bias, gate, (h, w), S, g)
    assert_close(K.forward(x, weight, bias, gate, (h, w), S), want_out)
    got = K.backward([g], [True, True, True, True], x, weight, bias, gate, (h, w), S)
    for name, a, e in zip(("x", "weight", "bias", "gate"), got, want):
        assert_close(a, e, name=f"grad {name}")


def _canary(shape):
    """A strided view of ``shape`` [N, C, H, W] inside a NaN buffer, and the mask of the view."""
    N, C, H, W = shape
    buf = torch.full((N + 1, C + 1, H + 2, W + 3), NAN, dtype=F64)
    inside = torch.zeros(buf.shape, dtype=torch.bool)
    index = (slice(1, None), slice(1, None), slice(1, H + 1), slice(2, W + 2))
    inside[index] = True
    return buf, buf[index], inside


@pytest.mark.parametrize("case", [(2, 4, 2, 2, 3, 4, 6), (1, 3, 1, 3, 3, 3, 3)], ids=["scrambled", "native"])
def test_outputs_written_exactly(case):
    """out and dx into strided views of NaN buffers: nothing outside is written, every element
    inside is, the values are right."""
    N, C, S, h, w, H, W = case
    x, weight, bias, gate = _inputs(*case)
    g = torch.randn(x.shape, dtype=F64)
    want_out, want = _reference(x, weight, bias, gate, (h, w), S, g)
    geo = K.geometry(x.shape, (h, w), S)
    buf, out, inside = _canary(x.shape)
    K.launch_gemm(x, weight, bias, gate, out, geo, backward=False)
    assert buf[~inside].isnan().all(), "forward wrote outside out"
    assert_close(out, want_out, name="out")
    buf, dx, inside = _canary(x.shape)
    part = K.dgate_partials(geo, F64, "cpu").fill_(NAN)
    K.launch_gemm(g, weight, bias, gate, dx, geo, backward=True, x=x, dgate_part=part)
    assert buf[~inside].isnan().all(), "dX wrote outside dx"
    assert not part.isnan().any(), "a dgate partial was left unwritten"
    assert_close(dx, want[0], name="dx")


def test_each_gradient_alone_is_the_same():
    x, weight, bias, gate = _inputs(2, 4, 2, 2, 3, 4, 6)
    g = torch.randn(x.shape, dtype=F64)
    args = (x, weight, bias, gate, (2, 3), 2)
    every = K.backward([g], [True] * 4, *args)
    for i in range(4):
        (alone,) = K.backward([g], [j == i for j in range(4)], *args)
        assert torch.equal(alone, every[i]), i


def test_without_bias_or_gate():
    """bias and gate are optional, alone or together (the train-mode block passes neither)."""
    x, weight, bias, gate = _inputs(2, 4, 2, 2, 3, 4, 6)
    g = torch.randn(x.shape, dtype=F64)
    for b, gt in ((None, gate), (bias, None), (None, None)):
        exact = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b, gt)]
        want_out = ref.partition_fc(*exact, (2, 3), 2)
        present = [t for t in exact if t is not None]
        want = torch.autograd.grad(want_out, present, g)
        needs = [t is not None for t in (x, weight, b, gt)]
        got = K.backward([g], needs, x, weight, b, gt, (2, 3), 2)
        assert_close(K.forward(x, weight, b, gt, (2, 3), 2), want_out)
        for a, e in zip(got, want):
            assert_close(a, e)


def test_empty_batch():
    x, weight, bias, gate = (t[:0] if i in (0, 3) else t for i, t in enumerate(_inputs(2, 4, 2, 2, 3, 4, 6)))
    assert K.forward(x, weight, bias, gate, (2, 3), 2).shape == x.shape
    got = K.backward([torch.empty_like(x)], [True] * 4, x, weight, bias, gate, (2, 3), 2)
    assert [t.shape for t in got] == [t.shape for t in (x, weight, bias, gate)]
    assert all(not t.any() for t in got)


def test_bf16_bit_for_bit_deterministic():
    x, weight, bias, gate = (t.requires_grad_() for t in _inputs(2, 8, 2, 3, 4, 6, 8, torch.bfloat16))
    g = torch.randn(x.shape, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = mixops.partition_fc(x, weight, bias, partition=(3, 4), num_sharesets=2, gate=gate, backend="triton")
        runs.append((out, *torch.autograd.grad(out, [x, weight, bias, gate], g)))
    for name, a, c in zip(("out", "dx", "dweight", "dbias", "dgate"), *runs):
        assert torch.equal(a, c), name


def test_pixel_run():
    """A partition's pixels are one run (of the W stride) where its rows follow each other in
    memory (native resolution; or one-row partitions): then the vector hint may span whole rows.
    Otherwise the partition width bounds the run."""
    geo = K.geometry((2, 8, 14, 14), (14, 14), 2)
    x = torch.empty(2, 8, 14, 14, dtype=torch.bfloat16)
    assert K.pixel_run(x, geo) == (196, 4)  # 392-byte rows: 8-byte vectors
    assert K.pixel_run(x.to(memory_format=torch.channels_last), geo) == (196, 1)  # a run of stride C
    assert K.pixel_run(x[..., :7], K.geometry((2, 8, 14, 7), (14, 7), 2)) == (7, 1)
    tiled = K.geometry((2, 8, 28, 28), (14, 14), 2)
    assert K.pixel_run(torch.empty(2, 8, 28, 28, dtype=torch.bfloat16), tiled) == (14, 2)
    rows = K.geometry((2, 8, 28, 28), (1, 28), 2)
    assert K.pixel_run(torch.empty(2, 8, 28, 28, dtype=torch.float32), rows) == (28, 4)


# --- GPU ------------------------------------------------------------------------------------

# (label, x shape, S, h): RepMLPNet-T224 stages 1-4 at batch 2, and stage 2's weights on a map of
# 2 x 2 partitions (the scrambled un-partition)
GPU_SHAPES = [
    pytest.param((2, 64, 56, 56), 1, 56, id="T224-s1"),
    pytest.param((2, 128, 28, 28), 4, 28, id="T224-s2"),
    pytest.param((2, 256, 14, 14), 16, 14, id="T224-s3"),
    pytest.param((2, 512, 7, 7), 128, 7, id="T224-s4"),
    pytest.param((2, 128, 56, 56), 4, 28, id="T224-s2-scrambled"),
]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, S, h", GPU_SHAPES)
def test_gpu_official_shapes(shape, S, h, dtype):
    N, C, H, W = shape
    x, weight, bias, gate = (t.requires_grad_() for t in _inputs(N, C, S, h, h, H, W, dtype, "cuda"))
    out = mixops.partition_fc(x, weight, bias, partition=(h, h), num_sharesets=S, gate=gate, backend="triton")
    g = torch.randn(out.shape, dtype=dtype, device="cuda")
    got = torch.autograd.grad(out, [x, weight, bias, gate], g)
    want_out, want = _reference(x, weight, bias, gate, (h, h), S, g)
    assert_close(out, want_out, dtype=dtype, name="out")
    for name, a, e in zip(("x", "weight", "bias", "gate"), got, want):
        assert_close(a, e, dtype=dtype, name=f"grad {name}")
