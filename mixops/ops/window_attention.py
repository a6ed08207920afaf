"""``mixops.window_attention``: UniFormer's windowed / global MHRA core (between qkv and proj).

The custom op is ``mixops::window_attention(Tensor qkv, int num_heads, int? window_size,
float scale, str padding, Tensor? qkv_bias, str backend) -> Tensor``; its ``torch`` backend is
``mixops.reference.window_attention.window_attention``.
"""
from __future__ import annotations

from numbers import Real
from typing import Optional

import torch

from .. import _validate as v
from ..reference import window_attention as _ref
from ._define import autocast_args, define_op

__all__ = ["window_attention"]

_PADDINGS = ("bias", "mask")


def _fake(qkv, num_heads, window_size, scale, padding, qkv_bias):
    return qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3)


_op = define_op(
    "window_attention",
    "(Tensor qkv, int num_heads, int? window_size, float scale, str padding, Tensor? qkv_bias)"
    " -> Tensor",
    reference=_ref.window_attention,
    fake=_fake,
)


def window_attention(
    qkv: torch.Tensor,
    *,
    num_heads: int,
    window_size: Optional[int],
    scale: Optional[float] = None,
    padding: str = "bias",
    qkv_bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Multi-head attention inside non-overlapping windows of a channels-last qkv tensor.

    Args:
        qkv: ``[B, H, W, 3C]`` (image) or ``[B, T, H, W, 3C]`` (video), the output of the qkv
            Linear on the *unpadded* map; the last axis is ``[q|k|v] x head x d`` with
            ``d = C / num_heads``. Any strides.
        num_heads: number of heads h; ``C`` must be divisible by it.
        window_size: ws, windows of ws x ws tokens anchored at (0, 0), row-major; ``None`` is
            global attention over all H*W tokens (T*H*W for video). Windowed video input is not
            supported (the official video model has only global attention): ValueError.
            ws may exceed H or W (the map is padded, as in the official code).
        scale: logit scale multiplying ``q @ k^T``; default ``d ** -0.5``.
        padding: how edge windows (H or W not a multiple of ws) are completed bottom/right.
            ``"bias"`` reproduces UniFormer: the padded tokens have ``q, k, v`` equal to the
            slices of ``qkv_bias`` (what zero-padding the LayerNorm output before the qkv
            Linear gives) and are *not* masked. ``"mask"`` excludes padded keys from the
            softmax (``qkv_bias`` then has no effect). Ignored when ``window_size`` is None.
        qkv_bias: ``[3C]``, the qkv Linear's bias (same dtype/device as ``qkv``); ``None``
            means zeros (a qkv Linear without bias).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or ``"auto"``; see ``mixops.backend``.

    Returns:
        ``[B, H, W, C]`` (``[B, T, H, W, C]``), contiguous: heads concatenated in order, before
        ``proj``. Only real pixels are returned.
    """
    qkv, qkv_bias = autocast_args("lower", qkv, qkv_bias)
    v.check_tensor("qkv", qkv, ndim=(4, 5))
    if qkv.numel() == 0:
        raise ValueError(f"qkv must not be empty, got shape {tuple(qkv.shape)}")
    C3 = qkv.shape[-1]
    v.check_divisible("qkv.shape[-1] (3C)", C3, "3", 3)
    C = C3 // 3
    v.check_int("num_heads", num_heads)
    v.check_divisible("C = qkv.shape[-1] / 3", C, "num_heads", num_heads)
    if window_size is not None:
        v.check_int("window_size", window_size)
        if qkv.dim() == 5:
            raise ValueError(
                "window_size must be None for video qkv [B, T, H, W, 3C] (only global "
                f"attention over T*H*W is supported), got window_size={window_size}"
            )
    if scale is None:
        scale = (C // num_heads) ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    v.check_choice("padding", padding, _PADDINGS)
    v.check_optional("qkv_bias", qkv_bias, "qkv", qkv, (C3,))
    return _op(qkv, num_heads, window_size, float(scale), padding, qkv_bias, backend=backend)


window_attention.op = _op.op
window_attention.backward_op = _op.backward_op
