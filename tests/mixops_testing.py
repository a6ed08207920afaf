"""Helpers shared by the tests: per-dtype tolerances, a verbose closeness check, devices."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path

import pytest
import torch

# ||out - ref|| / ||ref|| and max|out - ref| / max(max|ref|, 1), against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 6e-2),
}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, name: str = "output"):
    """``out`` matches ``ref`` within the tolerance of ``dtype`` (default: ``out.dtype``).

    NaN or inf never passes; the message gives the relative error, the max error and where
    the worst element sits.
    """
    dtype = dtype or out.dtype
    rel_tol, max_tol = TOLERANCES[dtype]
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    assert torch.isfinite(o).all(), f"{name}: {int((~torch.isfinite(o)).sum())} non-finite elements"
    assert torch.isfinite(r).all(), f"{name}: the reference has non-finite elements"
    diff = (o - r).abs()
    scale = r.norm().clamp_min(1e-30)
    rel = float((o - r).norm() / scale)
    worst = float(diff.max()) if diff.numel() else 0.0
    bound = max(float(r.abs().max()) if r.numel() else 0.0, 1.0)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    assert rel <= rel_tol and worst <= max_tol * bound, (
        f"{name} ({dtype}): relative error {rel:.3e} (tol {rel_tol:.1e}), "
        f"max error {worst:.3e} at {where} (tol {max_tol * bound:.1e})"
    )


def runs_on(op: str, backend: str, device: str) -> bool:
    """Whether ``backend``'s ``op`` runs on ``device`` tensors here (e.g. triton on CPU only
    under TRITON_INTERPRET=1, cuda never on CPU): tests skip the combinations that cannot."""
    from mixops.backend import implementation

    return implementation(op, backend).supports(torch.empty(0, device=device))


def skip_unless_runs(op: str, backend: str, device: str) -> None:
    if not runs_on(op, backend, device):
        pytest.skip(f"backend {backend!r} of mixops.{op} does not run on {device} tensors")


def only_backends(monkeypatch, op: str, *names: str) -> None:
    """Pretend ``op`` has only the backends ``names`` (for error-message tests that must not
    break when kernels are registered)."""
    from mixops import backend

    kept = {n: backend.implementation(op, n) for n in names}
    monkeypatch.setitem(backend._registry, op, kept)


def cpu_build_as_cuda(monkeypatch, *ops: str) -> str:
    """Register the extension's CPU build of each op (``torch.ops.mixops._<op>_cuda`` and its
    ``_backward``: csrc/*_cpu.cpp, the CUDA build's host code and maps run on the CPU) as that
    op's ``cuda`` backend for tensors of any device; returns the backend's name."""
    from mixops import backend

    for op in ops:
        name = "_" + op.lstrip("_")  # morph_fc -> _morph_fc_cuda, _atm_mix -> _atm_mix_cuda
        impl = backend.Impl(
            forward=getattr(torch.ops.mixops, f"{name}_cuda"),
            backward=getattr(torch.ops.mixops, f"{name}_cuda_backward"),
            supports=lambda t: True,
            auto=False,
        )
        monkeypatch.setitem(backend._registry.setdefault(op, {}), "cuda", impl)
    return "cuda"


def cpu_and_cuda():
    """Parametrize values for a ``device`` argument: cpu always, cuda marked needs_cuda."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


@contextlib.contextmanager
def fp32_matmul(api: str = "fp32_precision", value="tf32"):
    """``torch.backends.cuda.matmul.<api> = value`` inside the block (``allow_tf32`` = True, the
    legacy flag, or ``fp32_precision`` = "tf32" alone, which leaves the legacy flag disagreeing),
    then both the legacy precision and fp32_precision restored. monkeypatch cannot do this: the
    flags live behind the module's ``__getattr__``, and reading the legacy flag raises while the
    two APIs disagree."""
    matmul = torch.backends.cuda.matmul
    legacy, precision = torch.get_float32_matmul_precision(), matmul.fp32_precision
    setattr(matmul, api, value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        matmul.fp32_precision = precision


@functools.cache
def setup_py():
    """The repository's setup.py as a module, for the build's own lookups (``cutlass_include``,
    ...): ``setup()`` itself runs only when pip runs the file as ``__main__``."""
    spec = importlib.util.spec_from_file_location("mixops_setup", Path(__file__).resolve().parent.parent / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cutlass_headers(include: Path, version=(4, 2, 1)) -> Path:
    """A stand-in for the CUTLASS headers, in the layout setup.py looks for (cute/, cutlass/version.h)."""
    (include / "cute").mkdir(parents=True)
    (include / "cute" / "tensor.hpp").write_text("")
    (include / "cutlass").mkdir()
    (include / "cutlass" / "version.h").write_text(
        "#define CUTLASS_MAJOR {}\n#define CUTLASS_MINOR {}\n#define CUTLASS_PATCH {} \n".format(*version))
    return include
