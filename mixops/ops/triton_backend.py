"""The Triton backend: the one place where the kernels of ``mixops.kernels`` are registered as
the ``triton`` implementation of their ops (``mixops.backend.register``).

Nothing is registered where triton is not installed (it is a Linux-only dependency).
"""
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
