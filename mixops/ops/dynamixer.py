"""``mixops.dynamixer_mix``: the DynaMixerOp token mixing, before its ``out`` Linear.

The custom op ``mixops::dynamixer_mix`` (+ ``_backward``) is defined by ``define_op``; its
``torch`` backend is ``mixops.reference.dynamixer.dynamixer_mix``. Semantics:
``docs/dynamixer.md`` section 3.

The internal op ``mixops::_dynamixer_axis_mix(x, ..., axis) -> y`` of the fused
DynaMixerBlock path (``mixops.nn.DynaMixerBlock``) mixes the rows (axis "w") or the columns
(axis "h") of a channels-last ``[B, H, W, C]`` map and returns ``[B, H, W, C]``: a backend
reads the columns where they lie, with no transposed copy of x, y or their gradients. Its
``torch`` backend is ``mixops.reference.dynamixer.dynamixer_axis_mix``.

The internal op ``mixops::_dynamixer_reweighted(mixed_h, mixed_w, x, weight_h, weight_w,
weight_c, bias_h, bias_w, bias_c, alpha) -> [B, H, W, C]`` is the block's pass 2: the
reweighted sum of the three channel-FC branches (``mix_h.out``, ``mix_w.out``, ``mlp_c``)
before ``proj``, whose softmax weights alpha the mean identity gives before any branch output
exists (docs/dynamixer.md section 11). A backend computes it without storing a branch output.
Its ``torch`` backend is ``mixops.reference.dynamixer.dynamixer_reweighted``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as v
from ..reference import dynamixer as _ref
from ._define import autocast_args, define_op

__all__ = ["dynamixer_axis_mix", "dynamixer_mix", "dynamixer_reweighted"]

AXES = ("h", "w")

_SCHEMA = (
    "(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
    "Tensor generate_bias, int num_head, int reduced_dim) -> Tensor"
)


def _fake(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim):
    # every backend returns a fresh contiguous [B', N, C] tensor, whatever the strides of x
    return x.new_empty(x.shape)


_op = define_op("dynamixer_mix", _SCHEMA, reference=_ref.dynamixer_mix, fake=_fake)


def _validate(x, n, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim):
    """The parameters' checks for x whose mixed sequences have n tokens."""
    v.check_int("num_head", num_head)
    v.check_int("reduced_dim", reduced_dim)
    params = (
        ("compress_weight", compress_weight, 2),
        ("compress_bias", compress_bias, 1),
        ("generate_weight", generate_weight, 2),
        ("generate_bias", generate_bias, 1),
    )
    for name, t, ndim in params:
        v.check_tensor(name, t, ndim=ndim)
        v.check_like(name, t, "x", x)
    c = x.shape[-1]
    v.check_divisible("x.shape[-1] (channels C)", c, "num_head", num_head)
    sd = num_head * reduced_dim
    v.check_shape("compress_weight", compress_weight, (sd, c))
    v.check_shape("compress_bias", compress_bias, (sd,))
    v.check_shape("generate_weight", generate_weight, (n * n, n * reduced_dim))
    v.check_shape("generate_bias", generate_bias, (n * n,))


def dynamixer_mix(
    x: torch.Tensor,
    compress_weight: torch.Tensor,
    compress_bias: torch.Tensor,
    generate_weight: torch.Tensor,
    generate_bias: torch.Tensor,
    *,
    num_head: int,
    reduced_dim: int,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Dynamic token mixing of DynaMixerOp, without the final ``out`` Linear.

    Args:
        x: ``[B', N, C]``, the B' sequences of N tokens; C divisible by ``num_head`` (S).
        compress_weight: ``[S*d, C]`` and compress_bias ``[S*d]``: one dense Linear over all C
            channels, output feature ``s*d + k`` (segment-major); d = ``reduced_dim``.
        generate_weight: ``[N*N, N*d]`` and generate_bias ``[N*N]``: one Linear shared by all
            segments, input feature ``l*d + k`` (token-major), output logit ``p*N + q``.
        num_head: S, the number of contiguous channel segments ``[s*C/S, (s+1)*C/S)``.
        reduced_dim: d, the compressed features per token and segment.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or None (see mixops.backend).

    Returns:
        contiguous ``[B', N, C]``: output token q of segment s is
        ``sum_p P[p, q] * x[p, segment s]`` with ``P = softmax over p`` of the logits (every
        column of P sums to one).

    Raises:
        TypeError / ValueError naming the argument: ranks, dtypes, devices, shapes that do not
        fit (N, num_head, reduced_dim), C not divisible by num_head.
    """
    x, compress_weight, compress_bias, generate_weight, generate_bias = autocast_args(
        "lower", x, compress_weight, compress_bias, generate_weight, generate_bias
    )
    v.check_tensor("x", x, ndim=3)
    _validate(x, x.shape[1], compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim)
    return _op(
        x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim,
        backend=backend,
    )


dynamixer_mix.op = _op.op
dynamixer_mix.backward_op = _op.backward_op


_AXIS_SCHEMA = _SCHEMA.replace("int reduced_dim)", "int reduced_dim, str axis)")


def _axis_fake(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim, axis):
    return x.new_empty(x.shape)


_axis_op = define_op("_dynamixer_axis_mix", _AXIS_SCHEMA, reference=_ref.dynamixer_axis_mix, fake=_axis_fake)


def dynamixer_axis_mix(
    x: torch.Tensor,
    compress_weight: torch.Tensor,
    compress_bias: torch.Tensor,
    generate_weight: torch.Tensor,
    generate_bias: torch.Tensor,
    *,
    num_head: int,
    reduced_dim: int,
    axis: str,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``dynamixer_mix`` of the rows (``axis="w"``, sequences in batch order (b, h)) or the
    columns (``axis="h"``, batch order (b, w)) of channels-last x ``[B, H, W, C]``; returns a
    contiguous ``[B, H, W, C]``. The parameters are those of :func:`dynamixer_mix` with N the
    mixed axis' length. Internal op of the fused DynaMixerBlock path."""
    x, compress_weight, compress_bias, generate_weight, generate_bias = autocast_args(
        "lower", x, compress_weight, compress_bias, generate_weight, generate_bias
    )
    v.check_choice("axis", axis, AXES)
    v.check_tensor("x", x, ndim=4)
    n = x.shape[1] if axis == "h" else x.shape[2]
    _validate(x, n, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim)
    return _axis_op(
        x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim, axis,
        backend=backend,
    )


dynamixer_axis_mix.op = _axis_op.op
dynamixer_axis_mix.backward_op = _axis_op.backward_op


def _reweighted_fake(mixed_h, mixed_w, x, weight_h, weight_w, weight_c, bias_h, bias_w, bias_c, alpha):
    return x.new_empty(x.shape)


_reweighted_op = define_op(
    "_dynamixer_reweighted",
    "(Tensor mixed_h, Tensor mixed_w, Tensor x, Tensor weight_h, Tensor weight_w, Tensor weight_c, "
    "Tensor? bias_h, Tensor? bias_w, Tensor? bias_c, Tensor alpha) -> Tensor",
    reference=_ref.dynamixer_reweighted,
    fake=_reweighted_fake,
)


def dynamixer_reweighted(
    mixed_h: torch.Tensor,
    mixed_w: torch.Tensor,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]],
    alpha: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``h*a0 + w*a1 + c*a2`` (the official add order) with ``h = mixed_h @ W_h^T + b_h``,
    ``w = mixed_w @ W_w^T + b_w``, ``c = x @ W_c^T + b_c``: the three maps ``[B, H, W, C]`` of
    one shape, ``weights`` = (W_h, W_w, W_c) each ``[C, C]``, ``biases`` each ``[C]`` or None,
    alpha ``[B, C, 3]`` (fp32; fp64 for fp64 maps; not autocast). Returns a contiguous
    ``[B, H, W, C]`` in the maps' dtype. Internal op of the fused DynaMixerBlock path."""
    *maps, wh, ww, wc, bh, bw, bc = autocast_args("lower", mixed_h, mixed_w, x, *weights, *biases)
    names = ("mixed_h", "mixed_w", "x")
    first = v.check_tensor(names[0], maps[0], ndim=4)
    for name, t in zip(names[1:], maps[1:]):
        v.check_tensor(name, t)
        v.check_like(name, t, names[0], first)
        v.check_shape(name, t, first.shape)
    B, C = first.shape[0], first.shape[-1]
    for name, w in zip(("weight_h", "weight_w", "weight_c"), (wh, ww, wc)):
        v.check_tensor(name, w, ndim=2)
        v.check_like(name, w, names[0], first)
        v.check_shape(name, w, (C, C))
    for name, b in zip(("bias_h", "bias_w", "bias_c"), (bh, bw, bc)):
        v.check_optional(name, b, names[0], first, (C,))
    v.check_branch_weights(alpha, names[0], first, (B, C, 3))
    return _reweighted_op(*maps, wh, ww, wc, bh, bw, bc, alpha, backend=backend)


dynamixer_reweighted.op = _reweighted_op.op
dynamixer_reweighted.backward_op = _reweighted_op.backward_op
