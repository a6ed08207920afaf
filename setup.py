"""Build and install mixops.

The Python package always installs. The CUDA extension ``mixops._C`` is built from ``csrc/`` by
CMake (``CMakeLists.txt``) when PyTorch is a CUDA build and nvcc is found, or when forced:

    MIXOPS_FORCE_CUDA=1     build the extension, and fail loudly if it cannot be built
    MIXOPS_SKIP_CUDA=1      never build it (pure-Python install)
    TORCH_CUDA_ARCH_LIST    target architectures, e.g. "9.0a" or "8.0;9.0a" (default: the visible
                            GPU, else "8.0+PTX;9.0a"); sm_80 or newer, Hopper as 9.0a
    MAX_JOBS                parallel compile jobs (default: all cores)
    CUDA_HOME / CUDA_PATH   the CUDA toolkit, when nvcc is not on PATH
    MIXOPS_CUTLASS_INCLUDE  a directory holding CUTLASS 4.2's ``cute/`` and ``cutlass/`` headers
                            (default: ``.cutlass/include`` in the checkout, the staging folder of
                            the offline GPU machine, else those of the installed ``nvidia-cutlass``)

The extension's GEMMs are built on CUTLASS/CuTe, header-only, from the ``nvidia-cutlass`` wheel:
``pip install --no-deps nvidia-cutlass==4.2.0.0`` (its declared dependencies are for its Python
kernel generator, which the build does not use). Without the headers the extension is skipped,
or the build fails when forced.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_library_root() -> str | None:
    """site-packages/nvidia/cu<major>: the CUDA library headers and .so files pip installs with
    a CUDA build of torch (a compiler-only toolkit lacks cusparse.h, cublas_v2.h, ...)."""
    import torch

    major = torch.version.cuda.split(".")[0]
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return None
    for base in nvidia.__path__:
        cand = Path(base) / f"cu{major}"
        if (cand / "include").is_dir():
            return str(cand)
    return None


CUTLASS_VERSION = (4, 2)
CUTLASS_INSTALL = "pip install --no-deps nvidia-cutlass==4.2.0.0"


class CutlassHeadersMissing(Exception):
    """The CUTLASS/CuTe headers the extension needs are not there (or not version 4.2)."""


def _cutlass_version(include: Path) -> tuple[int, int, int]:
    text = (include / "cutlass" / "version.h").read_text()
    return tuple(int(re.search(rf"#define CUTLASS_{part}\s+(\d+)", text)[1]) for part in ("MAJOR", "MINOR", "PATCH"))


def installed_cutlass_include() -> Path | None:
    """``cutlass_library/source/include`` of the installed ``nvidia-cutlass`` wheel. Located, not
    imported: importing ``cutlass_library`` loads its whole kernel generator."""
    spec = importlib.util.find_spec("cutlass_library")
    return Path(spec.origin).parent / "source" / "include" if spec and spec.origin else None


def cutlass_include() -> Path:
    """The directory holding CUTLASS 4.2's ``cute/`` and ``cutlass/``: ``MIXOPS_CUTLASS_INCLUDE``
    alone when it is set, else the first of ``.cutlass/include`` and the installed wheel's that
    holds them. Raises CutlassHeadersMissing saying what to install."""
    if os.environ.get("MIXOPS_CUTLASS_INCLUDE"):
        candidates = {"MIXOPS_CUTLASS_INCLUDE": Path(os.environ["MIXOPS_CUTLASS_INCLUDE"])}
    else:
        candidates = {".cutlass/include": ROOT / ".cutlass" / "include", "nvidia-cutlass": installed_cutlass_include()}
    for source, include in candidates.items():
        if include is None or not (include / "cute").is_dir() or not (include / "cutlass" / "version.h").is_file():
            continue
        version = _cutlass_version(include)
        if version[:2] != CUTLASS_VERSION:
            raise CutlassHeadersMissing(
                f"{include} ({source}) holds CUTLASS {'.'.join(map(str, version))}, mixops needs "
                f"{'.'.join(map(str, CUTLASS_VERSION))}.x: {CUTLASS_INSTALL}")
        return include.resolve()
    looked = ", ".join(f"{source} ({include})" for source, include in candidates.items())
    raise CutlassHeadersMissing(f"no CUTLASS/CuTe headers (cute/, cutlass/) in {looked}: {CUTLASS_INSTALL}")


def _cuda_build_decision() -> tuple[bool, str]:
    """(build?, why) for the CUDA extension."""
    if _flag("MIXOPS_SKIP_CUDA"):
        return False, "MIXOPS_SKIP_CUDA is set"
    force = _flag("MIXOPS_FORCE_CUDA")
    try:
        import torch
    except ImportError:
        why = "torch is not importable at build time (install with --no-build-isolation)"
        if force:
            raise RuntimeError(f"MIXOPS_FORCE_CUDA=1 but {why}")
        return False, why
    if torch.version.cuda is None and not force:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if _find_nvcc() is None:
        if force:
            raise RuntimeError("MIXOPS_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    try:
        cutlass_include()
    except CutlassHeadersMissing as missing:
        if force:
            raise RuntimeError(f"MIXOPS_FORCE_CUDA=1 but {missing}") from None
        return False, str(missing)
    return True, "forced" if force else f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPU's architecture ('a' features on sm_90 and
    later, for wgmma/TMA), else sm_80 with its PTX (later GPUs compile that at load time) and
    sm_90a."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return check_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}{'a' if major >= 9 else ''}"
    return "8.0+PTX;9.0a"


def check_arch_list(archs: str) -> str:
    """An architecture list the kernels can run on: every entry sm_80 or newer (their GEMMs
    pipeline with cp.async), and Hopper only as 9.0a. A plain 9.0 has no wgmma, so its copy of the
    Hopper GEMM tile would be a trap the dispatcher cannot tell from the real one."""
    for entry in re.split(r"[;\s]+", archs.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)(a|f)?(\+PTX)?", entry)
        if m is None:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r} (expected e.g. '8.0', '9.0a', '8.0+PTX')")
        if int(m.group(1)) < 8:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: {entry} is older than sm_80, which the mixops kernels need")
        if m.group(1) == "9" and m.group(3) != "a":
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST: {entry} lacks the 'a' features: use {m.group(1)}.{m.group(2)}a")
    return archs


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt, placing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = _find_nvcc()
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            # the real nvcc, not a wrapper script, so CMake can locate the toolkit next to it
            f"-DCMAKE_CUDA_COMPILER={os.path.realpath(nvcc)}",
            f"-DMIXOPS_CUTLASS_INCLUDE={cutlass_include()}",
        ]
        lib_root = _cuda_library_root()
        if lib_root:
            args.append(f"-DMIXOPS_CUDA_LIBRARY_ROOT={lib_root}")
        args.append(f"-DTORCH_CUDA_ARCH_LIST={_arch_list()}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


# behind __main__ (which is how pip runs it) so that tests can import the functions above
if __name__ == "__main__":
    BUILD_CUDA, WHY = _cuda_build_decision()
    print(f"mixops: {'building' if BUILD_CUDA else 'skipping'} the CUDA extension ({WHY})")

    setup(
        name="mixops",
        version="0.1.0",
        description="Fused Triton and CUDA kernels for the token mixers of MLP-like and hybrid vision backbones",
        long_description=(ROOT / "README.md").read_text(),
        long_description_content_type="text/markdown",
        license="MIT",
        python_requires=">=3.10",
        packages=find_packages(include=["mixops", "mixops.*"]) + ["mixops.kernels"],
        package_dir={"mixops.kernels": "kernels"},
        install_requires=["torch>=2.4", "numpy", "triton; platform_system == 'Linux'"],
        extras_require={
            "test": ["pytest", "pytest-benchmark", "torchvision"],
            # torchvision: deform_conv2d, the official ATM baseline; matplotlib: the PNG plot
            "bench": ["torchvision", "matplotlib"],
        },
        entry_points={"console_scripts": ["mixops-bench = mixops.bench.cli:main"]},
        ext_modules=[CMakeExtension("mixops._C")] if BUILD_CUDA else [],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
