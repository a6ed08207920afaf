"""The CUDA sources: CMake builds every one of them, and they compile for the oldest
architectures the build supports.

CI builds the extension for sm_90a only (two cores compile slowly), so this compiles each kernel
file once more, object only, for sm_75 (the oldest CUDA 13 targets: fp16 tensor cores, no bf16/
TF32 ones) and sm_80 (bf16/TF32 tensor cores), with the flags the CMake build uses. (Register
spills are checked on the sm_90a build itself, in the family's CUDA tests.)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from cuda_sass import CSRC, cuda_sources

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


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_for_sm75_and_sm80(source, tmp_path):
    includes = [str(CSRC), *_cuda_library_include(), sysconfig.get_paths()["include"],
                *cpp_extension.include_paths(device_type="cuda")]
    cmd = [
        _nvcc(), "-c", str(CSRC / source), "-o", str(tmp_path / "k.o"),
        "-gencode", "arch=compute_75,code=sm_75", "-gencode", "arch=compute_80,code=sm_80",
        "-std=c++20", "-O3", "-DNDEBUG", "-Xcompiler=-fPIC", "--expt-relaxed-constexpr",
        *(f"-I{d}" for d in includes),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
