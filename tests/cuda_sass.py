"""The CUDA sources of the extension and the device code of its build, read without a GPU:
``cuobjdump -sass`` of ``mixops._C``, split into one SASS listing per (architecture, kernel)."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def cuda_sources() -> list[Path]:
    """The CUDA translation units of the extension: every csrc/*.cu, the rule CMakeLists.txt
    collects its sources by (tests/test_cuda_sources.py checks that it still does)."""
    return sorted(CSRC.glob("*.cu"))


def _cuobjdump() -> str | None:
    """cuobjdump of the toolkit, else the one Triton bundles."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        from triton.backends.nvidia import __file__ as nvidia_backend
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(nvidia_backend), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else None


def object_sass(path: str, keep=lambda name: True, arch: str | None = None) -> dict[tuple[str, str], str]:
    """(arch, mangled kernel name) -> SASS of the kernels of a binary (extension, object file or
    cubin) whose name passes ``keep`` (skips the test when there is no cuobjdump). A cubin's dump
    names no architecture: ``arch`` gives the one it was compiled for."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (toolkit or Triton's bundle) to read the device code with")
    return {(a or arch, name): sass for (a, name), sass in _dump(tool, path, os.stat(path).st_mtime_ns).items()
            if keep(name)}


@functools.lru_cache(maxsize=4)
def _dump(tool: str, path: str, mtime_ns: int) -> dict[tuple[str | None, str], str]:
    """Every kernel's SASS in ``path``, read once per file version: the extension's dump takes
    ~45 s of cuobjdump on two cores, and a dozen tests read it."""
    dump = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    kernels, arch = {}, None
    for block in re.split(r"\n(?=arch = |\s+Function : )", dump):
        if block.startswith("arch = "):
            arch = block.split()[2]
        elif "Function : " in block:
            kernels[(arch, block.split("Function : ")[1].split()[0])] = block
    return kernels


def extension_sass(family: str) -> dict[tuple[str, str], str]:
    """(arch, mangled kernel name) -> SASS of every kernel of ``csrc/<family>.cu`` in the build
    that is not an engine GEMM (skips the test when there is no extension or no cuobjdump)."""
    ext = pytest.importorskip("mixops._C", reason="the CUDA extension is not built")
    return object_sass(ext.__file__, lambda name: f"_{family}_cu_" in name and ENGINE_KERNEL not in name)


ENGINE_KERNEL = "gathered_gemm_kernel"


def extension_engine_sass(tag: str = "") -> dict[tuple[str, str], str]:
    """(arch, mangled name) -> SASS of the built extension's engine kernels whose name holds
    ``tag`` (e.g. a family's operand type), for a build with sm_90a code: skips without one,
    unless CI built one for sm_90a (MIXOPS_EXPECT_CUDA_EXTENSION=1, 9.0a in TORCH_CUDA_ARCH_LIST),
    where a missing sm_90a kernel fails."""
    ext = pytest.importorskip("mixops._C", reason="the CUDA extension is not built")
    kernels = object_sass(ext.__file__, lambda name: ENGINE_KERNEL in name and tag in name)
    if not any(arch == "sm_90a" for arch, _ in kernels):
        why = f"the build has no sm_90a engine kernel{' of ' + tag if tag else ''}: {sorted({a for a, _ in kernels})}"
        if os.environ.get("MIXOPS_EXPECT_CUDA_EXTENSION") == "1" and "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", ""):
            pytest.fail(why)
        pytest.skip(why)
    return kernels


def engine_tile(name: str) -> str:
    """The engine tile (csrc/gemm/tiles.cuh) of a mangled gathered_gemm_kernel name."""
    return re.search(r"gathered_gemm_kernelINS0_\d+(Sm90Wgmma|Sm80Mma|Tf32Mma|Simt)", name).group(1)


# tile -> the instructions its SASS must hold (every pattern), per architecture
ENGINE_MUST = {
    "sm_90a": {"Sm90Wgmma": [r"\bHGMMA\.", r"\bLDGSTS"], "Tf32Mma": [r"\bHMMA\.", r"\bLDGSTS"],
               "Simt": [r"\b[FD]FMA\b", r"\bLDGSTS"]},
    "sm_80": {"Sm80Mma": [r"\bHMMA\.", r"\bLDGSTS", r"\bLDSM"], "Tf32Mma": [r"\bHMMA\.", r"\bLDGSTS"],
              "Simt": [r"\b[FD]FMA\b", r"\bLDGSTS"]},
}


def check_engine_kernels(kernels: dict[tuple[str, str], str], arch: str) -> set[str]:
    """Asserts ENGINE_MUST[arch], no spills and no trap for every engine kernel of `arch`; returns the tiles seen."""
    tiles = set()
    for (a, name), sass in kernels.items():
        if a != arch:
            continue
        tile = engine_tile(name)
        tiles.add(tile)
        assert tile in ENGINE_MUST[arch], f"{tile} has no business on {arch}: {name}"
        for pattern in ENGINE_MUST[arch][tile]:
            assert re.search(pattern, sass), f"{name} on {arch} lacks {pattern}"
        assert "BPT.TRAP" not in sass, f"{name} on {arch} is a trap stand-in"
        assert not spills(sass), f"{name} spills on {arch}"
    return tiles


def ampere_or_newer(kernels: dict[tuple[str, str], str]) -> list[str]:
    """The sm_80+ architectures of the build (skips the test when there are none)."""
    archs = sorted({a for a, _ in kernels if int(re.sub(r"\D", "", a)) >= 80})
    if not archs:
        pytest.skip(f"the build has no sm_80+ code: {sorted({a for a, _ in kernels})}")
    return archs


def spills(sass: str) -> bool:
    """Whether the kernel touches local memory (register spills)."""
    return bool(re.search(r"\b(STL|LDL)\b", sass))


def calls(sass: str) -> bool:
    """Whether the kernel has an out-of-line subroutine: with everything else inlined, what is
    left is the compiler's 64-bit integer division / remainder (the general case of its ``/``
    and ``%`` sequence), which ends in a ``RET.REL``. (A ``CALL.REL.NOINC`` alone proves nothing:
    ptxas also emits it as a predicated jump out of a loop, to the next instruction.)"""
    return bool(re.search(r"\bRET\.", sass))


# The window-attention kernels (csrc/window_attention_kernels.cuh): which kernel, which engine
# tile names its MMAs (the dtype), and the padded head dim, read from a mangled name.
ATTENTION_KERNELS = ("forward_kernel", "key_grad_kernel", "query_grad_kernel")
ATTENTION_MATHS = ("Sm80MmaIN7cutlass6half_t", "Sm80MmaIN7cutlass10bfloat16_t", "Tf32Mma", "SimtIfE", "SimtIdE")


def attention_kernel(name: str) -> tuple[str, str, int] | None:
    """(kernel, math, padded head dim) of a window-attention kernel's mangled name, else None."""
    if "16window_attention" not in name:
        return None
    kernel = next(k for k in ATTENTION_KERNELS if k in name)
    math = next(m for m in ATTENTION_MATHS if m in name)
    return kernel, math, int(re.search(r"ELi(\d+)ELi[12]EEEEEv", name).group(1))


# The window-attention kernels are the extension's only ones that spill (ptxas of nvcc 13.0, at
# 255 registers): on sm_90a 11 of the 30 -- all d = 128 backward kernels, the TF32 ones, the fp16
# dQ at d = 64 -- with 2 to 29 local stores and 3 to 31 local loads; on sm_80 5, all TF32 or fp64.
# A known defect (docs/window_attention.md section 7), bounded here so that it cannot grow
# unnoticed; every other kernel must not spill at all.
ATTENTION_SPILL_LIMIT = 32  # local-memory instructions of each kind (STL, LDL) per kernel


def known_spill(name: str, sass: str) -> bool:
    """Whether a kernel's spills are the bounded, documented ones of the window-attention kernels."""
    return attention_kernel(name) is not None and all(
        len(re.findall(rf"\b{op}\b", sass)) <= ATTENTION_SPILL_LIMIT for op in ("STL", "LDL"))
