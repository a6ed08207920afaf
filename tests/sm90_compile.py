"""Compiling Triton kernels for sm_90 on a machine without a GPU: the CPU test of what the
interpreter accepts but the GPU backend rejects, and of the register spills ptxas reports.

The tests' own process runs with TRITON_INTERPRET=1, under which the kernels cannot be compiled,
so each test module lists its builds and runs them in a child process without it:

    _BUILDS = {"fwd-fp32": (...), ...}           # name -> arguments of the module's _build
    def _build_all(): sm90_compile.build_all(_BUILDS, _build)
    @pytest.fixture(scope="module")
    def sm90_builds(): return sm90_compile.run_builds("test_module", timeout=600)

``_build`` returns ``compile_sm90(...)``'s dict; ``assert_built`` checks one.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable


def ptxas_spills(ptx: str) -> int | None:
    """Bytes ptxas spills for sm_90a (the ptxas bundled with triton; None if it is absent).
    ``CompiledKernel.n_spills`` is filled in only when a driver loads the kernel."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", os.devnull], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(run.stderr)
    return sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", run.stderr))


def compile_sm90(fn, signature: dict, constexprs: dict, options: dict | None = None, **extra) -> dict:
    """Compile ``fn`` for sm_90: whether a cubin came out, ptxas's spill bytes, and ``extra``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options=options or {},
    )
    return {"cubin": "cubin" in compiled.asm, "spills": ptxas_spills(compiled.asm["ptx"]), **extra}


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
    assert got["spills"] in (0, None), f"ptxas spills {got['spills']} bytes with {got.get('cfg')}"
