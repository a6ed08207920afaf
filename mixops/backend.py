"""Which implementation of an op runs: the backend registry and its selection rules.

Every public op has one implementation per backend:

- ``torch``  -- the pure-PyTorch reference (``mixops.reference``), runs on any device;
- ``triton`` -- the kernels in ``mixops.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``);
- ``cuda``   -- the compiled extension ``mixops._C`` (CUDA tensors).

A backend is chosen per call, in this order of precedence:

1. the op's ``backend=`` argument;
2. the innermost ``with mixops.use_backend(...)`` block;
3. the ``MIXOPS_BACKEND`` environment variable;
4. ``"auto"``: cuda > triton > torch on CUDA tensors, torch on CPU tensors, skipping kernels
   registered with ``auto=False`` (not yet verified on a GPU).

An explicit choice that an op does not have, or that cannot run on the given tensors, is an
error naming what is available: a silent fallback would hide a slow path from a benchmark.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = BACKENDS + ("auto",)
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}

_requested: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "mixops_backend", default=None
)


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op.

    ``forward(*inputs)`` takes the op's schema arguments (backend excluded) and returns its
    output(s). ``backward(grads, needs, *inputs)`` gets one flag per tensor input (schema
    order; False for a None input or one that needs no gradient) and returns the gradients of
    the flagged inputs only, in schema order. ``supports(tensor)`` says whether it can run on
    that tensor's device.
    """

    forward: Callable
    backward: Callable
    supports: Callable[[torch.Tensor], bool]
    auto: bool = True


_registry: dict[str, dict[str, Impl]] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1,
    set by the tests before anything imports triton). Read at every call, so a test may set or
    clear the variable."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Where each backend can run unless its registration says otherwise.
_DEFAULT_SUPPORTS: dict[str, Callable[[torch.Tensor], bool]] = {
    "torch": lambda t: True,
    "triton": lambda t: t.is_cuda or (t.device.type == "cpu" and interpreting()),
    "cuda": lambda t: t.is_cuda,
}


def register(
    op: str,
    backend: str,
    *,
    forward: Callable,
    backward: Callable,
    supports: Optional[Callable[[torch.Tensor], bool]] = None,
    auto: bool = True,
) -> None:
    """Register ``backend``'s implementation of ``mixops.<op>``.

    ``supports(tensor)`` says whether it runs on that tensor's device; the default is the
    backend's own rule (torch: anywhere; triton: CUDA, or CPU under TRITON_INTERPRET=1;
    cuda: CUDA). ``auto=False`` keeps it out of the ``"auto"`` choice (it runs only when asked
    for by name): for kernels that have not yet been verified on a GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = Impl(forward, backward, supports or _DEFAULT_SUPPORTS[backend], auto)
    _registry.setdefault(op, {})[backend] = impl


def available_backends(op: str) -> tuple[str, ...]:
    """The backends registered for ``mixops.<op>``, in the order of BACKENDS."""
    have = _registry.get(op, {})
    return tuple(b for b in BACKENDS if b in have)


def implementation(op: str, backend: str) -> Impl:
    """The registered implementation; ``backend`` must be a concrete, resolved name."""
    try:
        return _registry[op][backend]
    except KeyError:
        raise ValueError(
            f"backend {backend!r} is not available for mixops.{op}; "
            f"available: {', '.join(available_backends(op)) or 'none'}"
        ) from None


def _check_choice(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"{source} must be one of {_CHOICES}, got {name!r}")
    return name


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for by argument, context, environment or default (may be 'auto')."""
    if backend is not None:
        return _check_choice(backend, "backend")
    ctx = _requested.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("MIXOPS_BACKEND")
    if env:
        return _check_choice(env, "MIXOPS_BACKEND")
    return "auto"


def resolve(op: str, backend: Optional[str], like: torch.Tensor) -> str:
    """The concrete backend that runs ``mixops.<op>`` on tensors like ``like``."""
    name = requested_backend(backend)
    if name == "auto":
        order = _AUTO_ORDER["cuda" if like.is_cuda else "cpu"]
        for cand in order:
            impl = _registry.get(op, {}).get(cand)
            if impl is not None and impl.auto and impl.supports(like):
                return cand
        raise ValueError(
            f"no backend of mixops.{op} runs on {like.device.type} tensors; "
            f"registered: {', '.join(available_backends(op)) or 'none'}"
        )
    impl = implementation(op, name)
    if not impl.supports(like):
        raise ValueError(
            f"backend {name!r} of mixops.{op} cannot run on {like.device.type} tensors"
        )
    return name


def fused_backend(op: str, internal_ops: tuple[str, ...], like: torch.Tensor) -> Optional[str]:
    """The backend ``mixops.<op>`` resolves to for ``like`` when it also implements every op of
    ``internal_ops`` (a module's fused path), else None: the module then runs its unfused
    sequence of public ops on that backend. Resolving raises for an unavailable choice, as
    every op call does."""
    name = resolve(op, None, like)
    return name if all(name in available_backends(o) for o in internal_ops) else None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with backend ``name`` unless a call says otherwise."""
    token = _requested.set(_check_choice(name, "backend"))
    try:
        yield
    finally:
        _requested.reset(token)
