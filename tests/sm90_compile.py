"""Compiling Triton kernels for sm_90 on a machine without a GPU: the CPU test of what the
interpreter accepts but the GPU backend rejects, and of the register spills ptxas reports.

The tests' own process runs with TRITON_INTERPRET=1, under which the kernels cannot be compiled,
so each test module lists its builds and runs them in a child process without it:

    _BUILDS = {"fwd-fp32": (...), ...}           # name -> arguments of the module's _build
    def _build_all(): sm90_compile.build_all(_BUILDS, _build)
    @pytest.fixture(scope="module")
    def sm90_builds(): return sm90_compile.run_builds("test_module", timeout=600)

``_build`` returns ``compile_sm90(...)``'s dict; ``assert_built`` checks one. ``jit_signature``
specialises the arguments as the JIT does at launch (so the PTX has the vector widths a real
launch gets), and ``compile_sm90`` reports the width of every global load and store.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable


def ptxas_stats(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) that ``ptxas -v`` reports for sm_90a, with the
    ptxas triton bundles. ``CompiledKernel.n_spills`` is filled in only when a driver loads the
    kernel, so the count must come from ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, spills


def jit_signature(fn, values: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``fn`` as the JIT specialises a launch: ``values`` maps
    every runtime argument to a pointer type (``"*bf16"``: a torch allocation, 16-byte aligned),
    an int value (1 becomes the constant 1, a multiple of 16 gets the divisibility-16 attribute)
    or a type string (``"i32"``: nothing known)."""
    signature, constexprs, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, str):
            signature[name] = v
            if v.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif v == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def global_access_bits(ptx: str, op: str) -> list[int]:
    """Bits moved by each ``op`` ("ld" or "st") global instruction of ``ptx``: 16 for a scalar
    bf16 load, 32 for ``ld.global.b32``, 128 for ``ld.global.v4.b32``, ..."""
    bits = []
    for suffix in re.findall(rf"\b{op}\.global((?:\.[\w:]+)+)", ptx):
        parts = suffix.split(".")[1:]
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        width = next(int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p))
        bits.append(lanes * width)
    return bits


def cp_async_bytes(ptx: str) -> list[int]:
    """Bytes moved by each cp.async global -> shared copy of ``ptx``: the pipelined operand
    loads of a tl.dot (.cg moves 16 bytes; .ca 4, 8 or 16; the size is printed in hex)."""
    return [int(n, 0) for n in re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, (0x[0-9a-f]+|\d+)(?:, %?\w+)?;", ptx)]


def compile_sm90(fn, signature: dict, constexprs: dict, options: dict | None = None, attrs: dict | None = None,
                 **extra) -> dict:
    """Compile ``fn`` for sm_90: whether a cubin came out, ptxas's registers per thread and spill
    bytes, the bits of each global load and store (``load_bits``, ``store_bits``), the bytes of
    each cp.async copy (``copy_bytes``), and ``extra``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=options or {},
    )
    ptx = compiled.asm["ptx"]
    registers, spills = ptxas_stats(ptx)
    return {
        "cubin": "cubin" in compiled.asm,
        "registers": registers,
        "spills": spills,
        "load_bits": global_access_bits(ptx, "ld"),
        "store_bits": global_access_bits(ptx, "st"),
        "copy_bytes": cp_async_bytes(ptx),
        **extra,
    }


def launch_signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a launch ``kernel[grid](*args, **kwargs)`` as
    the JIT specialises it on a GPU (tensor arguments: their data pointers' alignment)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        ty, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs, options


def compile_launch(kernel, args: tuple, kwargs: dict, **extra) -> dict:
    """compile_sm90 of a recorded launch (launch_signature)."""
    signature, constexprs, attrs, options = launch_signature(kernel, args, kwargs)
    return compile_sm90(kernel, signature, constexprs, options, attrs, **extra)


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records (kernel, args,
    kwargs) into ``calls`` instead of launching."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def build_all(builds: dict[str, tuple], build: Callable[..., dict]) -> None:
    """Child-process entry point: run every build, print the results as one JSON line."""
    results = {}
    for name, args in builds.items():
        try:
            results[name] = build(*args)
        except Exception as e:  # reported per build by the test
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


def run_builds(module: str, timeout: int) -> dict:
    """Run ``module._build_all()`` in a child process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    run = subprocess.run(
        [sys.executable, "-c", f"import {module} as t; t._build_all()"],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_built(got: dict) -> None:
    """The build produced a cubin without ptxas spills."""
    assert "error" not in got, got.get("error")
    assert got["cubin"]
    assert got["spills"] == 0, f"ptxas spills {got['spills']} bytes with {got.get('cfg')}"
