"""ActiveMLP's ATM as public ops: ``mixops.atm_sample`` (the per-channel 1-D deformable gather)
and ``mixops.atm_fc`` (the gather fused with the following 1x1 FC, i.e. the official ATMOp).

Both take channels-last ``x [B,H,W,C]`` and COMPACT offsets ``[B,H,W,C/share]`` (channel ``c``
uses offset ``c // share``, as ``repeat_interleave``), in pixels, unbounded, zero padding
outside the image (``docs/atm.md`` sections 3-5).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as v
from ..reference import atm as _ref
from ._define import autocast_args, define_op

__all__ = ["atm_fc", "atm_sample"]

_AXES = ("h", "w")


def _sample_fake(x, offset, axis, share):
    return x.new_empty(x.shape)


def _fc_fake(x, offset, weight, bias, axis, share):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_atm_sample = define_op(
    "atm_sample",
    "(Tensor x, Tensor offset, str axis, int share) -> Tensor",
    reference=_ref.atm_sample,
    fake=_sample_fake,
)

_atm_fc = define_op(
    "atm_fc",
    "(Tensor x, Tensor offset, Tensor weight, Tensor? bias, str axis, int share) -> Tensor",
    reference=_ref.atm_fc,
    fake=_fc_fake,
)


def _check_gather(x: object, offset: object, axis: object, share: object) -> None:
    """Checks shared by both ops: ranks, dtype/device, axis, share, the compact offset shape."""
    v.check_tensor("x", x, ndim=4)
    v.check_tensor("offset", offset, ndim=4)
    v.check_like("offset", offset, "x", x)
    v.check_choice("axis", axis, _AXES)
    v.check_int("share", share)
    B, H, W, C = x.shape
    v.check_divisible("x.shape[-1] (channels)", C, "share", share)
    v.check_shape("offset", offset, (B, H, W, C // share))


def atm_sample(
    x: torch.Tensor,
    offset: torch.Tensor,
    *,
    axis: str,
    share: int = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-channel 1-D zero-padded linear-interpolation gather.

    Args:
        x: ``[B,H,W,C]`` channels-last features.
        offset: ``[B,H,W,C/share]`` offsets in pixels; channel ``c`` uses ``offset[..., c // share]``.
        axis: ``"w"`` samples ``x[b,i,:,c]`` at ``j + offset`` (same row); ``"h"`` samples
            ``x[b,:,j,c]`` at ``i + offset`` (same column).
        share: how many consecutive channels share one offset (ActiveMLP's ``share_dim``).
        backend: ``None`` (context / env / auto), ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B,H,W,C]`` in ``x.dtype``. Samples at ``p <= -1`` or ``p >= n`` are 0; exact
        integers return ``x[p]``; the offset gradient is the right-hand slope at integers.
    """
    x, offset = autocast_args("fp32", x, offset)
    _check_gather(x, offset, axis, share)
    return _atm_sample(x, offset, axis, share, backend=backend)


def atm_fc(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    axis: str,
    share: int = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The ATM gather followed by the FC: ``atm_sample(x, offset) @ weight.T + bias``.

    This is the official ``ATMOp`` (deform_conv2d with a 1x1 kernel) on channels-last tensors.

    Args:
        x: ``[B,H,W,C]``.
        offset: ``[B,H,W,C/share]`` (see ``atm_sample``).
        weight: ``[C_out, C]`` (an ATMOp weight ``[C_out, C, 1, 1]`` is ``weight.flatten(1)``).
        bias: ``[C_out]`` or None.
        axis, share, backend: as in ``atm_sample``.

    Returns:
        ``[B,H,W,C_out]``.
    """
    x, offset, weight, bias = autocast_args("fp32", x, offset, weight, bias)
    _check_gather(x, offset, axis, share)
    v.check_tensor("weight", weight, ndim=2)
    v.check_like("weight", weight, "x", x)
    v.check_shape("weight", weight, (weight.shape[0], x.shape[-1]))
    v.check_optional("bias", bias, "x", x, (weight.shape[0],))
    return _atm_fc(x, offset, weight, bias, axis, share, backend=backend)
