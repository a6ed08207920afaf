"""sm_90 builds of the RepMLP Triton kernels, no GPU needed: the launches the launchers make at
RepMLPNet-T224's four stages (B = 128, docs/repmlp.md section 8) and a scrambled map, compiled
for sm_90 with the argument specialization a real launch gets; ptxas's registers and spills
read back (tests/sm90_compile.py)."""
from __future__ import annotations

import pytest

import sm90_compile

# (label, x shape, S, h): T224 stages 1-4 at native resolution, and stage 2's weights on a map
# of 2 x 2 partitions (the scrambled un-partition)
SHAPES = {
    "s1": ((128, 64, 56, 56), 1, 56),
    "s2": ((128, 128, 28, 28), 4, 28),
    "s3": ((128, 256, 14, 14), 16, 14),
    "s4": ((128, 512, 7, 7), 128, 7),
    "s2x2": ((2, 128, 56, 56), 4, 28),
}
KERNELS = ("forward", "input_grad", "weight_grad")
_BUILDS = {
    **{f"{k}-bf16-{s}": (k, "bfloat16", s) for k in KERNELS for s in SHAPES},
    **{f"{k}-{d}-{s}": (k, d, s) for k in KERNELS for d in ("float32", "tf32") for s in ("s1", "s4")},
    **{f"{k}-float64-s3": (k, "float64", "s3") for k in KERNELS},
}


def _build(kernel: str, dtype_name: str, shape: str) -> dict:
    """Record the launch of ``kernel`` that the entry points make at ``shape`` and compile it."""
    import torch

    from mixops.kernels import repmlp as K

    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
    (N, C, H, W), S, h = SHAPES[shape]
    hw = h * h
    x = torch.empty((N, C, H, W), dtype=dtype)
    weight, bias = torch.empty((S * hw, hw, 1, 1), dtype=dtype), torch.empty(S * hw, dtype=dtype)
    gate = torch.empty((N, C), dtype=dtype)
    calls = []
    names = ("_partition_gemm_kernel", "_weight_grad_kernel")
    originals = [getattr(K, n) for n in names]
    for n, fn in zip(names, originals):
        setattr(K, n, sm90_compile.Recorder(fn, calls))
    column_sum = K.column_sum
    K.column_sum = lambda t: torch.zeros(t.shape[0], t.shape[2], dtype=t.dtype)
    try:
        if kernel == "forward":
            K.forward(x, weight, bias, gate, (h, h), S)
        else:
            needs = [True, False, False, True] if kernel == "input_grad" else [False, True, True, False]
            K.backward([torch.empty_like(x)], needs, x, weight, bias, gate, (h, h), S)
    finally:
        for n, fn in zip(names, originals):
            setattr(K, n, fn)
        K.column_sum = column_sum
    wanted = originals[1] if kernel == "weight_grad" else originals[0]
    (fn, args, kwargs), = [c for c in calls if c[0] is wanted]
    return sm90_compile.compile_launch(fn, args, kwargs, cfg={"num_warps": kwargs["num_warps"]})


def _build_all():
    """Child-process entry point (sm90_compile.run_builds)."""
    sm90_compile.build_all(_BUILDS, _build)


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_compile.run_builds("test_repmlp_sm90", timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("build", list(_BUILDS))
def test_kernel_compiles_for_sm90_without_spills(sm90_builds, build):
    sm90_compile.assert_built(sm90_builds[build])


@pytest.mark.slow
def test_operands_move_as_vectors(sm90_builds):
    """At native resolution a partition is one contiguous run (pixel_run) and the host-checked
    vector hints reach the pipelined cp.async copies: stage 2 (hw = 784, 1568-byte bf16 rows)
    moves x and W in 16-byte copies and stores 16-byte vectors; stage 3 (hw = 196, 392-byte rows)
    in 8-byte ones, which the JIT alone (196 is no multiple of 16) would leave 2-byte scalars --
    too narrow for cp.async, so nothing would be pipelined."""
    s2, s3 = sm90_builds["forward-bf16-s2"], sm90_builds["forward-bf16-s3"]
    assert set(s2["copy_bytes"]) == {16} and set(s2["store_bits"]) == {128}, s2
    assert set(s3["copy_bytes"]) == {8} and set(s3["store_bits"]) == {64}, s3
    assert set(sm90_builds["input_grad-bf16-s3"]["copy_bytes"]) == {8}
    assert set(sm90_builds["weight_grad-bf16-s3"]["copy_bytes"]) == {8}
