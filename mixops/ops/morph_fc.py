"""``mixops.morph_fc``: one chunked token-FC branch of MorphMLP's MorphFC.

The op is the custom op ``mixops::morph_fc`` (schema below) with the ``torch`` backend
``mixops.reference.morph_fc.morph_fc``; the wrapper here validates the arguments first.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as v
from ..reference import morph_fc as _ref
from ._define import autocast_args, define_op

__all__ = ["morph_fc"]

AXES = ("w", "h", "hs", "t")


def _fake(x, weight, bias, segment_dim, axis):
    return x.new_empty(x.shape)


_op = define_op(
    "morph_fc",
    "(Tensor x, Tensor weight, Tensor? bias, int segment_dim, str axis) -> Tensor",
    reference=_ref.morph_fc,
    fake=_fake,
)


def _feature_size(x: torch.Tensor, segment_dim: int, axis: str) -> int:
    """The FC width the axis needs; checks the divisibility the official reshapes rely on."""
    C = x.shape[-1]
    if axis == "t":
        v.check_divisible("x channels (x.shape[-1])", C, "segment_dim (channel groups G)", segment_dim)
        return x.shape[1] * C // segment_dim
    H, W = x.shape[-3], x.shape[-2]
    v.check_divisible("x channels (x.shape[-1])", C, "segment_dim", segment_dim)
    v.check_divisible("x tokens per frame (H*W)", H * W, "segment_dim", segment_dim)
    return C


def morph_fc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    segment_dim: int,
    axis: str,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One chunked token-FC branch on channels-last ``x``; the output has x's shape.

    Args:
        x: ``[B, H, W, C]`` (image, T = 1) or ``[B, T, H, W, C]``; axis "t" needs the 5-D form.
        weight: ``[C, C]`` for the spatial axes; ``[F, F]`` with ``F = T * C / segment_dim``
            for axis "t" (e.g. 32-frame stage 3: C = 392, G = 14, T = 16, F = 448).
        bias: ``[C]`` / ``[F]`` or None. It is indexed by the FC feature ``p * D + s``
            (position in chunk, channel in group; ``t * D_t + s`` for "t"), NOT by output
            channel.
        segment_dim: L for the spatial axes: the chunk length and the channel-group count,
            ``D = C / L``; ``C % L == 0`` and ``(H * W) % L == 0`` are required (no padding).
            For axis "t" it is the channel-group count G (``D_t = C / G``); the whole clip is
            one FC row.
        axis: ``"w"`` (chunks of L consecutive tokens of the row-major sequence ``h*W + w``;
            a chunk may span rows), ``"h"`` (the same on the column-major sequence
            ``w*H + h``), ``"hs"`` (stage-4 strided chunks: chunk k holds tokens
            ``p * (H*W/L) + k``), or ``"t"`` (temporal groups).
        backend: ``None`` (context / environment / auto), ``"torch"``, ``"triton"``, ``"cuda"``.

    Returns:
        A contiguous tensor of x's shape and dtype.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, dtype, device,
        shape, divisibility, or axis.
    """
    x, weight, bias = autocast_args("lower", x, weight, bias)
    v.check_choice("axis", axis, AXES)
    v.check_tensor("x", x, ndim=5 if axis == "t" else (4, 5))
    v.check_int("segment_dim", segment_dim)
    v.check_tensor("weight", weight, ndim=2)
    v.check_like("weight", weight, "x", x)
    n = _feature_size(x, segment_dim, axis)
    if tuple(weight.shape) != (n, n):
        how = (
            f"F = T*C/segment_dim = {x.shape[1]}*{x.shape[-1]}/{segment_dim}"
            if axis == "t"
            else "C = x.shape[-1]"
        )
        raise ValueError(
            f"weight must have shape ({n}, {n}) for axis {axis!r} ({how}), got {tuple(weight.shape)}"
        )
    v.check_optional("bias", bias, "x", x, (n,))
    return _op(x, weight, bias, segment_dim, axis, backend=backend)


morph_fc.op = _op.op
morph_fc.backward_op = _op.backward_op
