"""The CUDA sources: CMake builds every one of them, and they compile for the oldest
architecture the build supports.

CI builds the extension for sm_90a only (two cores compile slowly), so this compiles each kernel
file's device code once more, to a cubin, for sm_80 (the oldest architecture of the GEMM engine:
cp.async, bf16/TF32 tensor cores), with the flags the CMake build uses. (Device code only: the
host half of a translation unit is the same for every architecture and the CI build compiles it;
skipping it here takes ~30% off each compile.) (The sm_90a build itself is read
in tests/test_gemm_engine.py and the families' CUDA tests.)
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import cuda_sass
from cuda_sass import CSRC, cuda_sources
from mixops_testing import setup_py

SOURCES = [p.name for p in cuda_sources()]
expected = os.environ.get("MIXOPS_EXPECT_CUDA_EXTENSION") == "1"


def _cuda_library_include() -> list[str]:
    """site-packages/nvidia/cu<major>/include, where pip puts the CUDA library headers."""
    try:
        import nvidia
    except ImportError:
        return []
    major = torch.version.cuda.split(".")[0]
    return [str(Path(b) / f"cu{major}" / "include") for b in nvidia.__path__ if (Path(b) / f"cu{major}" / "include").is_dir()]


def _cutlass_include() -> list[str]:
    """The CUTLASS/CuTe headers, found as setup.py finds them for the CMake build."""
    try:
        return [str(setup_py().cutlass_include())]
    except setup_py().CutlassHeadersMissing:
        if expected:
            raise
        return []  # a source that includes them then fails with the header it misses


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None or torch.version.cuda is None:
        if expected:
            pytest.fail("nvcc and a CUDA build of torch are expected here (MIXOPS_EXPECT_CUDA_EXTENSION=1)")
        pytest.skip("no nvcc or no CUDA build of torch")
    return nvcc


def test_cmake_builds_every_source_by_the_rule_the_tests_read():
    """CMakeLists.txt collects csrc/*.cu and csrc/*.cpp with a glob, not a hand-kept list, so
    a new file is built (and checked here and in cuda_sass.py) without touching either."""
    cmake = (CSRC.parent / "CMakeLists.txt").read_text()
    assert re.search(r"file\(GLOB MIXOPS_SOURCES CONFIGURE_DEPENDS csrc/\*\.cu csrc/\*\.cpp\)", cmake), cmake
    assert not re.search(r"csrc/\w+\.(cu|cpp)\b", cmake), "CMakeLists.txt names a source by hand"
    assert {"atm.cu", "diagnostics.cu", "morph_fc.cu"} <= set(SOURCES)


# Issue 9: csrc/ spells each shared idiom once. pattern -> the files that may spell it (its
# definition); every other file uses the definition (Acc<T> / kAccDtype<T>, cdiv, MIXOPS_HD,
# MIXOPS_FLOAT_SWITCH / MIXOPS_GEMM_SWITCH in common.cuh; check_device_and_dtype and check_like_x
# in tensor_checks.h).
ONE_SPELLING = {
    r"std::conditional_t<std::is_same_v<\w+, double>, double, float>": {"common.cuh"},
    r"at::acc_type|opmath_type|toAccumulateType|CppTypeToScalarType<Acc": {"common.cuh"},
    r"\(\s*([\w.]+)\s*\+\s*([\w.]+)\s*-\s*1\s*\)\s*/\s*\2\b": {"common.cuh"},
    r"__host__\s+__device__|C10_HOST_DEVICE": {"common.cuh"},
    r"AT_DISPATCH_": set(),
    r"float32, float16, bfloat16 or float64": {"common.cuh", "tensor_checks.h"},
    r"(device|scalar_type)\(\) ==": {"tensor_checks.h"},
}


@pytest.mark.parametrize("pattern", ONE_SPELLING)
def test_shared_idioms_are_spelled_once(pattern):
    spelled = {p.name for p in CSRC.iterdir() if p.suffix in {".cu", ".cpp", ".cuh", ".h"}
               if re.search(pattern, p.read_text())}
    assert spelled <= ONE_SPELLING[pattern], sorted(spelled - ONE_SPELLING[pattern])


@pytest.mark.slow
def test_compiles_for_sm80_with_tensor_core_engine_tiles(tmp_path):
    """Every source compiled for sm_80, the oldest architecture the GEMM engine runs on (cp.async),
    one compile per core at a time (each takes minutes on one core; all at once, the heaviest
    were killed for memory in CI); its engine kernels hold what cuda_sass.ENGINE_MUST asks of
    sm_80 (HMMA, ldmatrix, LDGSTS; no wgmma), and no kernel spills to local memory but the
    bounded ones of the window-attention kernels (cuda_sass.known_spill)."""
    nvcc = _nvcc()
    includes = [str(CSRC), *_cutlass_include(), *_cuda_library_include(), sysconfig.get_paths()["include"],
                *cpp_extension.include_paths(device_type="cuda")]

    def compile_sm80(source):
        obj = tmp_path / f"{source}.cubin"
        cmd = [nvcc, "-cubin", str(CSRC / source), "-o", str(obj), "-gencode", "arch=compute_80,code=sm_80",
               "-std=c++20", "-O3", "-DNDEBUG", "-Xcompiler=-fPIC", "--expt-relaxed-constexpr",
               *(f"-I{d}" for d in includes)]
        return obj, subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = dict(zip(SOURCES, pool.map(compile_sm80, SOURCES)))
    tiles = set()
    for source, (obj, proc) in runs.items():
        out = proc.stdout
        assert proc.returncode == 0, f"{source}:\n{out[-4000:]}"
        kernels = cuda_sass.object_sass(str(obj), arch="sm_80")
        tiles |= cuda_sass.check_engine_kernels(
            {key: sass for key, sass in kernels.items() if cuda_sass.ENGINE_KERNEL in key[1]}, "sm_80")
        spilling = [name for (_, name), sass in kernels.items()
                    if cuda_sass.spills(sass) and not cuda_sass.known_spill(name, sass)]
        assert not spilling, f"{source}: spills on sm_80: {spilling}"
    assert tiles == {"Sm80Mma", "Tf32Mma", "Simt"}, tiles
