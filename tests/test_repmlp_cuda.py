"""The CUDA backend of ``partition_fc`` (csrc/repmlp.cu), through its CPU build.

On CPU tensors the extension's ``_partition_fc_cuda`` (+ backward) runs csrc/repmlp_cpu.cpp: the
same host functions (repmlp.h), operands and epilogues (repmlp_operands.cuh) as the CUDA build,
each GEMM one grouped launch run tile by tile on the engine's tiles by gemm/host_engine.h. These
tests register that build as the op's ``cuda`` backend for CPU tensors and run the backend suite
of tests/test_repmlp_ops.py on it, plus shapes past one 128 x 128 tile (hw = 144: dgate's tile-sum
partials of two column tiles; 450 rows per share-set) and the deploy block. The kernels
themselves run only in the needs_cuda tests.
"""
from __future__ import annotations

import pytest
import torch

import cuda_sass
import mixops
import test_repmlp_module as module_suite
import test_repmlp_ops as ops_suite
from mixops_testing import cpu_build_as_cuda

pytestmark = pytest.mark.skipif(
    not mixops.cuda_extension_available(), reason=f"extension not built: {mixops.cuda_extension_status()}"
)

F64 = torch.float64


@pytest.fixture
def cpu_build(monkeypatch):
    """The CPU build as the ``cuda`` backend of partition_fc."""
    return cpu_build_as_cuda(monkeypatch, "partition_fc")


# (N, C, S, h, w, H, W) past one engine tile: hw = 144 (two column tiles of dX, so dgate adds two
# tile-sum partials), scrambled 2 x 3 partitions; 450 rows per share-set (four row tiles)
WIDE = [(2, 16, 4, 12, 12, 24, 36), (3, 300, 2, 3, 4, 3, 4)]


@pytest.mark.parametrize("case", ops_suite.CASES + WIDE)
def test_matches_reference(case, cpu_build):
    ops_suite.test_partition_fc_matches_reference(case, F64, "cpu", cpu_build)
    ops_suite.test_partition_fc_gated_matches_reference(case, F64, "cpu", cpu_build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_storage_dtypes(dtype, cpu_build):
    ops_suite.test_partition_fc_gated_matches_reference(ops_suite.CASES[2], dtype, "cpu", cpu_build)


@pytest.mark.parametrize("case", ops_suite.CASES[:3])
def test_awkward_layouts(case, cpu_build):
    ops_suite.test_partition_fc_awkward_layouts(case, cpu_build)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias, cpu_build):
    ops_suite.test_partition_fc_gradcheck((1, 4, 2, 2, 3, 4, 3), bias, cpu_build)
    ops_suite.test_partition_fc_gated_gradcheck((2, 2, 1, 2, 2, 4, 4), cpu_build)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias, cpu_build):
    ops_suite.test_partition_fc_opcheck(bias, "channels_last", 4, 6, cpu_build)
    ops_suite.test_partition_fc_gated_opcheck(bias, 4, 6, cpu_build)


def test_deterministic(cpu_build):
    ops_suite.test_partition_fc_is_deterministic("cpu", cpu_build)


def test_empty_batch(cpu_build):
    x = torch.randn(0, 4, 4, 6, dtype=F64, requires_grad=True)
    w = torch.randn(24, 12, 1, 1, dtype=F64, requires_grad=True)
    gate = torch.rand(0, 4, dtype=F64, requires_grad=True)
    out = mixops.partition_fc(x, w, None, partition=(2, 6), num_sharesets=2, gate=gate, backend=cpu_build)
    assert out.shape == x.shape
    gx, gw, gg = torch.autograd.grad(out.sum(), [x, w, gate], allow_unused=True)
    assert gx.shape == x.shape and not gw.any() and gg.shape == gate.shape


@pytest.mark.parametrize("mode", ["deploy", "eval"])
def test_block(mode, cpu_build):
    """RepMLPBlock on the cuda backend, deploy (the gated op) and train-form eval (ungated)."""
    module_suite.test_module_matches_reference((8, 2, 4, 5, 8, 10), mode, F64, cpu_build)


def test_build_runs_every_gemm_on_the_engine():
    """The three GEMMs are engine kernels on sm_90a, one per (tile, dtype): bf16 and fp16 on
    wgmma, TF32, IEEE fp32 and fp64 on FMAs (test_gemm_engine.py checks every engine kernel's
    instructions and spills); no kernel calls the 64-bit division subroutine."""
    kernels = cuda_sass.extension_engine_sass("6repmlp")
    sm90 = {name for arch, name in kernels if arch == "sm_90a"}
    gemms = {
        "forward": ("16PartitionOperand", "12ForwardStore"),
        "dX (dgate tile sums)": ("14InputGradStore",),
        "dW (gated, split-K)": ("16GatedGradOperand", "11MatrixStore"),
    }
    for gemm, markers in gemms.items():
        names = {n for n in sm90 if all(m in n for m in markers)}
        tiles = sorted(cuda_sass.engine_tile(n) for n in names)
        assert set(tiles) == {"Simt", "Sm90Wgmma", "Tf32Mma"}, (gemm, tiles)
    for (arch, name), sass in kernels.items():
        assert not cuda_sass.calls(sass), f"{name} on {arch} calls the 64-bit division subroutine"


@pytest.mark.needs_cuda
def test_cuda_small_case_for_compute_sanitizer():
    """One small call of the op and its backward on the GPU, partial tiles on every edge, every
    dtype, the scrambled map; run this test alone under ``compute-sanitizer`` (memcheck,
    racecheck) to check the kernels' masks, tile sums and barriers."""
    for dtype in (F64, torch.float32, torch.float16, torch.bfloat16):
        for case in (ops_suite.CASES[1], WIDE[0]):
            ops_suite.test_partition_fc_gated_matches_reference(case, dtype, "cuda", "cuda")
