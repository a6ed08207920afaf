"""The shared Triton plumbing (``mixops.kernels._common``): every registered Triton entry point
runs under its inputs' CUDA device (checked on CPU by patching the device choice and
``torch.cuda.device``; on two GPUs for real), the dtype rules, the int64 offset rule, the
vector widths and the shape-only deterministic split."""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton.language as tl
from mixops.kernels import _common
import sm90_compile
from mixops_testing import assert_close, fp32_matmul

import mixops
from mixops import backend

f64 = torch.float64


def _randn(*shape):
    return torch.randn(shape, dtype=f64)


# op -> its schema inputs (backend excluded): one tiny CPU case per Triton op, channels C = 8
TRITON_OP_INPUTS = {
    "morph_fc": lambda: [_randn(1, 4, 6, 8), _randn(8, 8), _randn(8), 4, "w"],
    "_morph_branch": lambda: [_randn(1, 2, 4, 6, 8), _randn(8, 8), _randn(8), 4, "h"],
    "_reweighted_proj": lambda: [_randn(2, 3, 4, 8), _randn(2, 3, 4, 8), None, _randn(2, 8, 2), _randn(8, 8), None],
    "atm_sample": lambda: [_randn(1, 3, 4, 8), _randn(1, 3, 4, 8), "w", 1],
    "atm_fc": lambda: [_randn(1, 3, 4, 8), _randn(1, 3, 4, 4), _randn(6, 8), _randn(6), "h", 2],
    "_atm_means": lambda: [_randn(1, 3, 4, 8), _randn(1, 3, 4, 8), _randn(1, 3, 4, 8), 1],
    "_atm_mix": lambda: [
        _randn(1, 3, 4, 8), _randn(1, 3, 4, 8), _randn(1, 3, 4, 8), _randn(8, 8), _randn(8, 8), _randn(8, 8),
        _randn(8), None, _randn(1, 8, 3), 1,
    ],  # fmt: skip
    "dynamixer_mix": lambda: [_randn(2, 4, 6), _randn(4, 6), _randn(4), _randn(16, 8), _randn(16), 2, 2],
    "_dynamixer_reweighted": lambda: [
        _randn(2, 3, 2, 8), _randn(2, 3, 2, 8), _randn(2, 3, 2, 8), _randn(8, 8), _randn(8, 8), _randn(8, 8),
        _randn(8), _randn(8), None, _randn(2, 8, 3),
    ],  # fmt: skip
    "window_attention": lambda: [_randn(1, 5, 4, 24), 2, 3, 0.25, "bias", _randn(24)],
    "partition_fc": lambda: [_randn(2, 4, 4, 6), _randn(12, 6, 1, 1), _randn(12), _randn(2, 4), [2, 3], 2],
    "_dynamixer_axis_mix": lambda: [_randn(1, 4, 3, 6), _randn(4, 6), _randn(4), _randn(16, 8), _randn(16), 2, 2, "h"],
}


def _triton_ops() -> list[str]:
    return sorted(op for op, impls in backend._registry.items() if "triton" in impls)


def test_every_triton_op_has_a_guard_case():
    """A newly registered Triton op must get its case in TRITON_OP_INPUTS (below it is checked
    to run under its inputs' device)."""
    assert _triton_ops() == sorted(TRITON_OP_INPUTS)


def _as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.parametrize("op", sorted(TRITON_OP_INPUTS))
def test_triton_entry_points_run_under_the_inputs_device(op, monkeypatch):
    """Forward and backward of the registered Triton implementation enter
    ``torch.cuda.device(d)`` with d the device of the inputs (here pretended to be cuda:1;
    the kernels then run on the CPU tensors under the interpreter) and still compute the torch
    backend's result."""
    entered = []

    @contextlib.contextmanager
    def device_recorder(device):
        entered.append(torch.device(device))
        yield

    impl = backend.implementation(op, "triton")
    reference = backend.implementation(op, "torch")
    inputs = TRITON_OP_INPUTS[op]()
    monkeypatch.setattr(_common, "_input_device", lambda args: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "device", device_recorder)

    outs = _as_list(impl.forward(*inputs))
    assert entered == [torch.device("cuda", 1)]
    for got, want in zip(outs, _as_list(reference.forward(*inputs)), strict=True):
        assert_close(got, want)

    grads = [torch.randn_like(o) for o in outs]
    needs = [a is not None for a in inputs if a is None or isinstance(a, torch.Tensor)]
    got = impl.backward(grads, needs, *inputs)
    assert entered == [torch.device("cuda", 1)] * 2
    for g, w in zip(got, reference.backward(grads, needs, *inputs), strict=True):
        assert_close(g, w)


def test_input_device_is_the_first_tensors():
    """The device choice looks into lists (a backward's grads come first) and ignores
    non-tensors; CPU tensors need no guard, so the entry point runs as it is."""
    t = torch.zeros(1)
    assert _common._first_tensor(("w", [], [None, (3, t)], torch.ones(2))) is t
    assert _common._input_device(([t], "h")) is None

    calls = []
    guarded = _common.on_input_device(lambda *args: calls.append(args) or "done")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device", lambda device: pytest.fail("entered a device guard for CPU tensors"))
        assert guarded(t, 2) == "done"
    assert calls == [(t, 2)]


@pytest.mark.needs_cuda
def test_two_gpus_triton_runs_on_the_inputs_device():
    """morph_fc and atm_fc on cuda:1 while cuda:0 is current: forward and backward match the
    torch backend on the same device, and the current device is left as it was."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 or more CUDA GPUs, found {torch.cuda.device_count()}")
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)

    def run(fn, inputs, backend_name):
        leaves = [t.to(dev, torch.float32).requires_grad_() for t in inputs]
        out = fn(*leaves, backend_name)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        torch.cuda.synchronize(dev)
        return [out, *grads]

    cases = [
        (lambda x, w, b, be: mixops.morph_fc(x, w, b, segment_dim=14, axis="h", backend=be),
         [_randn(2, 28, 28, 112), _randn(112, 112) / 11, _randn(112)]),
        (lambda x, o, w, b, be: mixops.atm_fc(x, o, w, b, axis="w", backend=be),
         [_randn(2, 14, 14, 64), 3 * _randn(2, 14, 14, 64), _randn(96, 64) / 8, _randn(96)]),
    ]  # fmt: skip
    for fn, inputs in cases:
        for got, want in zip(run(fn, inputs, "triton"), run(fn, inputs, "torch")):
            assert got.device == dev
            assert_close(got, want, torch.float32)
        assert torch.cuda.current_device() == 0


def test_dot_dtypes_per_storage_dtype(monkeypatch):
    """fp64 exact; fp32 IEEE unless torch allows TF32; half types in their own dtype on a GPU
    and upcast to fp32 under the interpreter; accumulation fp32 (fp64 for fp64)."""
    assert _common.dot_dtypes(f64) == (tl.float64, tl.float64, "ieee")
    assert _common.dot_dtypes(torch.float32) == (tl.float32, tl.float32, "ieee")
    with fp32_matmul():
        assert _common.dot_dtypes(torch.float32) == (tl.float32, tl.float32, "tf32")
        assert _common.dot_dtypes(f64)[2] == "ieee"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.dot_dtypes(torch.bfloat16) == (tl.float32, tl.float32, "ieee")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _common.dot_dtypes(torch.float16) == (tl.float16, tl.float32, "ieee")
    assert _common.dot_dtypes(torch.bfloat16) == (tl.bfloat16, tl.float32, "ieee")
    assert _common.accumulate_dtype(torch.bfloat16) == torch.float32 and _common.accumulate_dtype(f64) == f64


def test_needs_idx64_at_the_int32_boundary():
    """int64 offsets from a largest element offset of 2**30 on (meta tensors: strides without
    memory); the stride of a size-1 dimension never counts."""

    def strided(shape, strides):
        return torch.empty_strided(shape, strides, device="meta")

    assert not _common.needs_idx64(strided((2,), (2**30 - 1,)), None)
    assert _common.needs_idx64(strided((2,), (2**30,)))
    assert _common.needs_idx64(strided((3, 2), (2**29, 1)))
    assert not _common.needs_idx64(strided((1, 2), (2**40, 1)))
    assert _common.strides(strided((1, 2), (2**40, 1))) == (0, 1)


def test_vector_width():
    """Elements per 16-byte-bounded vector along a unit-stride dimension: every other stride,
    the address and each extent must be multiples of it."""
    w = torch.empty(392, 392, dtype=torch.bfloat16)
    assert _common.vector_width(w, 1, 392) == 8  # 784-byte rows: 16-byte aligned
    assert _common.vector_width(w.float(), 1, 392) == 4
    assert _common.vector_width(w, 0, 392) == 1  # no unit stride along dim 0
    assert _common.vector_width(w.t(), 0, 392) == 8
    assert _common.vector_width(w, 1, 14) == 2  # runs of 14 channels
    assert _common.vector_width(w[:, 1:], 1, 391) == 1  # an odd element address
    assert _common.vector_width(torch.empty(2, 49, dtype=torch.bfloat16), 1, 49) == 1


def test_deterministic_split_is_a_function_of_the_shapes(monkeypatch):
    """~SPLIT_TARGET_PROGRAMS programs in all, at most one range per step of rows, at least
    one range; a single range under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.deterministic_split(10**6, 32, 1) == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    target = _common.SPLIT_TARGET_PROGRAMS
    assert _common.deterministic_split(10**6, 32, 1) == target
    assert _common.deterministic_split(10**6, 32, 7) == target // 7
    assert _common.deterministic_split(100, 32, 1) == 4
    assert _common.deterministic_split(10**6, 32, 2 * target) == 1
    assert _common.deterministic_split(0, 32, 1) == 1


def _column_sum_cases(dtype):
    """Awkward [B, M, N] views: N = 1, M prime, B > 1 with N past one column tile, a
    permuted and sliced view, an expanded (zero-stride) one."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, dtype=dtype, generator=g)

    return {
        "n1": rand(1, 1009, 1),
        "batched": rand(3, 37, 70),
        "strided": rand(41, 3, 50).permute(1, 0, 2)[:, ::2, 1::3],
        "expanded": rand(2, 1, 5).expand(2, 300, 5),
    }


def _gpu_split_rule(monkeypatch):
    """The GPU's split and tiles (not the interpreter's single range) while the kernel still
    runs under the interpreter; asking the device for its properties fails the test."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)

    def no_device_query(*args, **kwargs):
        raise AssertionError("the split asked the device")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device_query)


@pytest.mark.parametrize("gpu_split", [False, True], ids=["interpreter-split", "gpu-split"])
@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
def test_column_sum_matches_torch_sum(dtype, gpu_split, monkeypatch):
    """column_sum = x.sum(dim=1) in accumulate_dtype on every awkward view, with one range
    (interpreter) and with the GPU's split into fixed ranges plus the second pass; the same
    bits twice."""
    if gpu_split:
        _gpu_split_rule(monkeypatch)
    for name, x in _column_sum_cases(dtype).items():
        got = _common.column_sum(x)
        assert got.dtype == _common.accumulate_dtype(dtype)
        assert_close(got, x.to(f64).sum(dim=1), _common.accumulate_dtype(dtype), name=name)
        assert torch.equal(got, _common.column_sum(x)), name
    if gpu_split:
        assert _common.column_sum_split(1, 1009, 1) > 1  # the two-pass path ran


def test_column_sum_split_is_a_function_of_the_shape(monkeypatch):
    """The GPU split: deterministic_split over the column tiles, no empty range, never asking
    the device; empty inputs give zeros and bad input is refused before any launch."""
    _gpu_split_rule(monkeypatch)
    assert _common.column_sum_blocks(3136, 64) == (32, 64)
    assert _common.column_sum_split(1, 3136, 64) == triton_cdiv(3136, 32)  # 98 ranges of 32 rows
    assert _common.column_sum_split(2, 2**17, 64) == _common.SPLIT_TARGET_PROGRAMS // 2
    assert _common.column_sum_split(1, 10**6, 300 * 64) == 1
    assert _common.column_sum_blocks(1000, 1) == (128, 16)
    assert _common.column_sum_split(1, 1000, 1) == 8  # ranges of 128 rows
    assert _common.deterministic_split(1000, 32, 20) == 12
    assert _common.column_sum_split(20, 1000, 64) == 11  # 12 ranges of 96 rows would leave one empty
    assert torch.equal(_common.column_sum(torch.ones(2, 0, 3)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x must be"):
        _common.column_sum(torch.ones(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        _common.column_sum(torch.ones(1, 4, 4, dtype=torch.int32))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# sm_90 builds of the column sum (tests/sm90_compile.py; child process without the interpreter):
# storage dtype -> (pointer types, COMPUTE) at its largest use, the ATM stage 1 bias gradient
# (M = 128 * 56 * 56 pixels, N = 64 channels); pass 2 is the same kernel over fp32/fp64 partials
_COLUMN_SUM_BUILDS = {
    "fp32": ("*fp32", "*fp32", "fp32"), "bf16": ("*bf16", "*fp32", "fp32"), "fp16": ("*fp16", "*fp32", "fp32"),
    "fp64": ("*fp64", "*fp64", "fp64")
}  # fmt: skip


def _build(x_type, out_type, compute):
    M, N = 128 * 56 * 56, 64
    fn = _common._column_sum_kernel
    block_m, block_n = _common.column_sum_blocks(M, N)
    split = _common.column_sum_split(1, M, N)
    values = dict(x_ptr=x_type, out_ptr=out_type, M=M, N=N, ROWS=triton_cdiv(M, split),
                  sx_b=M * N, sx_m=N, sx_n=1, so_s=N, so_b=N, so_n=1)  # fmt: skip
    consts = dict(COMPUTE=getattr(tl, {"fp32": "float32", "fp64": "float64"}[compute]), IDX64=False,
                  BLOCK_M=block_m, BLOCK_N=block_n)  # fmt: skip
    signature, consts, attrs = sm90_compile.jit_signature(fn, values, consts)
    return sm90_compile.compile_sm90(fn, signature, consts, dict(num_warps=4), attrs)


def _build_all():
    """Child-process entry point (sm90_compile.run_builds)."""
    sm90_compile.build_all(_COLUMN_SUM_BUILDS, _build)


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_compile.run_builds("test_triton_common", timeout=600)


@pytest.mark.parametrize("build", list(_COLUMN_SUM_BUILDS))
def test_column_sum_compiles_for_sm90(sm90_builds, build):
    """The GPU build of the column sum compiles without spills; its unit-stride rows of a
    16-byte aligned tensor load as 16-byte vectors (N = 64 is a multiple of 16)."""
    got = sm90_builds[build]
    sm90_compile.assert_built(got)
    assert max(got["load_bits"]) == 128, got["load_bits"]
