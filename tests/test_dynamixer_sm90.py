"""sm_90 builds of the DynaMixer Triton kernels, no GPU needed: every launch the launchers make
at the official shapes (B = 128) is recorded, compiled for sm_90 with the argument
specialization a real launch gets, and ptxas's registers and spills read back
(tests/sm90_compile.py): the public op's [B', N, C] sequences, the block's columns (the H
branch's strided view: two sequence strides) and the block's pass 2 (the reweighted K = 3C
GEMM of kernels/_reweighted_mix.py on plain maps). The interpreter accepts what the GPU backend may reject (3-D tl.dot,
the register reshapes and permutes, fp64 exp); this is where that shows without a GPU."""
from __future__ import annotations

import pytest

import sm90_compile

# (label, B', N, C, S, d): DynaMixer-S stage 1 and stages 2-4, DynaMixer-M stage 1, DynaMixer-L
# stages 2-4 at B = 128 (docs/dynamixer.md section 7)
SHAPES = {
    "S1": (4096, 32, 192, 8, 2),
    "S2": (2048, 16, 384, 16, 2),
    "M1": (4096, 32, 256, 8, 2),
    "L2": (2048, 16, 512, 16, 8),
}
KERNELS = ("forward", "mix_input_grad", "logit_grad", "generate_grad", "weight_grad")
# (kernel, dtype, shape, sequences): "op" the public op's [B', N, C], "h" the block's columns
_BUILDS = {
    **{f"{k}-bf16-{s}": (k, "bfloat16", s, "op") for k in KERNELS for s in SHAPES},
    **{f"{k}-bf16-{s}-h": (k, "bfloat16", s, "h") for k in KERNELS for s in ("S1", "S2")},
    **{f"reweighted-bf16-{s}": ("reweighted", "bfloat16", s, "h") for s in SHAPES},
    **{f"{k}-tf32-{s}": (k, "tf32", s, "h" if k == "reweighted" else "op") for k in (*KERNELS, "reweighted")
       for s in ("S1", "L2")},
    **{f"{k}-fp32-{s}": (k, "float32", s, "h" if k == "reweighted" else "op") for k in (*KERNELS, "reweighted")
       for s in ("S1", "L2")},
    **{f"{k}-fp64-S1": (k, "float64", "S1", "op") for k in KERNELS},
}
# fp16/bf16 (the training dtypes, autocast) must not spill. TF32's 4-byte operands spill a
# little at 8 warps (24-732 bytes), IEEE fp32 and fp64 run every tl.dot as FMAs with both operand
# tiles in registers and spill more: they compile and compute right (docs/dynamixer.md section 10)
# The reweighted GEMM's fp32 tiles are ATMLayer's (94 registers, no spills: test_atm_layer.py).
FAST = [b for b in _BUILDS if "-bf16-" in b or b.startswith(("weight_grad", "reweighted"))]


def _build(kernel: str, dtype_name: str, shape: str, sequences: str) -> dict:
    """Record the launch of ``kernel`` the launchers make at ``shape`` and compile it."""
    import torch

    from mixops.kernels import _reweighted_mix as RM
    from mixops.kernels import _weight_grad as WG
    from mixops.kernels import dynamixer as K

    bp, n, c, s, d = SHAPES[shape]
    # "tf32": fp32 storage with torch allowing TF32 (the launchers read it: kernels/_common.py)
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
    dtype = torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    axis = None if sequences == "op" else "h"
    # the block's map [B, N, N, C] (B' = B*N columns), or the op's [B', N, C]
    x = torch.empty((bp, n, c) if axis is None else (bp // n, n, n, c), dtype=dtype)
    if kernel == "reweighted":
        calls = []
        original = RM._reweighted_mix_kernel
        RM._reweighted_mix_kernel = sm90_compile.Recorder(original, calls)
        try:
            K.reweighted_forward(x, x, x, *(torch.empty(c, c, dtype=dtype),) * 3, *(torch.empty(c, dtype=dtype),) * 2,
                                 None, torch.empty(x.shape[0], c, 3, dtype=acc))  # fmt: skip
        finally:
            RM._reweighted_mix_kernel = original
        (fn, args, kwargs), = calls
        return sm90_compile.compile_launch(fn, args, kwargs, cfg={"num_warps": kwargs["num_warps"]})
    xv = K.sequences(x, axis)
    params = (torch.empty(s * d, c, dtype=dtype), torch.empty(s * d, dtype=dtype),
              torch.empty(n * n, n * d, dtype=dtype), torch.empty(n * n, dtype=dtype))  # fmt: skip
    calls = []
    names = {"forward": "_mix_forward_kernel", "mix_input_grad": "_mix_input_grad_kernel",
             "logit_grad": "_logit_grad_kernel", "generate_grad": "_generate_grad_kernel"}  # fmt: skip
    # every kernel of the two files is recorded, not launched: a launcher may launch several
    kernels = [(K, attr) for attr in names.values()] + [(WG, "_weight_grad_kernel")]
    originals = [getattr(mod, attr) for mod, attr in kernels]
    for (mod, attr), fn in zip(kernels, originals):
        setattr(mod, attr, sm90_compile.Recorder(fn, calls))
    wanted = getattr(WG, "_weight_grad_kernel") if kernel == "weight_grad" else getattr(K, names[kernel])
    # the partial sums after a launch would run on these CPU tensors: not part of the build
    sums = (K.column_sum, WG.column_sum)
    K.column_sum = WG.column_sum = lambda t: torch.zeros(t.shape[0], t.shape[2], dtype=t.dtype)
    try:
        if kernel == "forward":
            K.launch_forward(xv, *params, K.sequences(torch.empty_like(x), axis), s, d)
        elif kernel in ("mix_input_grad", "logit_grad"):
            dr = torch.empty((*x.shape[:-1], s * d), dtype=acc)
            K.launch_mix_backward(xv, *params, xv, K.sequences(torch.empty_like(x), axis), K.sequences(dr, axis), s, d)
        elif kernel == "generate_grad":
            geometry = K._geometry(xv, s, d)
            K._generate_grads(xv, *params, xv, K.dynamixer_tiles(n, s, c // s, d), True, True, geometry)
        else:
            rows = (x.shape[0], -1)
            WG.linear_param_grads(torch.empty((*x.shape[:-1], s * d), dtype=acc).reshape(*rows, s * d),
                                  x.reshape(*rows, c), True, False)  # fmt: skip
    finally:
        for (mod, attr), fn in zip(kernels, originals):
            setattr(mod, attr, fn)
        K.column_sum, WG.column_sum = sums
    (fn, args, kwargs), = [c for c in calls if c[0] is wanted.kernel]
    return sm90_compile.compile_launch(fn, args, kwargs, cfg={"num_warps": kwargs.get("num_warps", 4)})


def _build_all():
    """Child-process entry point (sm90_compile.run_builds)."""
    sm90_compile.build_all(_BUILDS, _build)


@pytest.fixture(scope="module")
def sm90_builds():
    return sm90_compile.run_builds("test_dynamixer_sm90", timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("build", FAST)
def test_kernel_compiles_for_sm90_without_spills(sm90_builds, build):
    sm90_compile.assert_built(sm90_builds[build])


@pytest.mark.slow
@pytest.mark.parametrize("build", [b for b in _BUILDS if b not in FAST])
def test_fp32_and_fp64_kernel_compiles_for_sm90(sm90_builds, build):
    got = sm90_builds[build]
    assert "error" not in got, got.get("error")
    assert got["cubin"]
