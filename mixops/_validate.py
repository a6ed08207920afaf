"""Argument checks shared by the public ops and modules.

Every check raises before any computation, with a message that names the argument, what was
expected and what was received (DESIGN.md, Conventions).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Union[int, Sequence[int], None] = None,
    floating: bool = True,
) -> torch.Tensor:
    """``t`` is a tensor (floating point unless ``floating=False``) with an allowed rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOATING:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(
                f"{name} must have {want} dimensions, got shape {tuple(t.shape)}"
            )
    return t


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has the dtype and device of ``ref``."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
        )


def check_shape(name: str, t: torch.Tensor, expected: Iterable[int]) -> None:
    """``t`` has exactly the shape ``expected``."""
    expected = tuple(int(e) for e in expected)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def check_optional(
    name: str, t: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor, shape: Iterable[int]
) -> None:
    """An optional tensor, when given, has ``shape`` and the dtype/device of ``ref``."""
    if t is None:
        return
    check_tensor(name, t)
    check_like(name, t, ref_name, ref)
    check_shape(name, t, shape)


def check_branch_weights(alpha: object, ref_name: str, ref: torch.Tensor, shape: Iterable[int]) -> None:
    """The softmax weights ``alpha`` of a fused reweighting have ``shape``, ref's device and the
    accumulate dtype of ref (fp32; fp64 for fp64): they are formed in fp32 from fp32 means and
    are not autocast."""
    check_tensor("alpha", alpha)
    dtype = torch.promote_types(ref.dtype, torch.float32)
    if alpha.dtype != dtype:
        raise TypeError(f"alpha must be {dtype} for {ref.dtype} {ref_name}, got {alpha.dtype}")
    if alpha.device != ref.device:
        raise ValueError(f"alpha must be on the device of {ref_name} ({ref.device}), got {alpha.device}")
    check_shape("alpha", alpha, shape)


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` is a Python int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    """``value`` is a multiple of ``divisor`` (the official reshapes need it; no padding)."""
    if divisor <= 0 or value % divisor != 0:
        raise ValueError(
            f"{name} ({value}) must be divisible by {divisor_name} ({divisor})"
        )
