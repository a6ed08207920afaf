"""``mixops.dynamixer_mix``: the DynaMixerOp token mixing, before its ``out`` Linear.

The custom op ``mixops::dynamixer_mix`` (+ ``_backward``) is defined by ``define_op``; its
``torch`` backend is ``mixops.reference.dynamixer.dynamixer_mix``. Semantics:
``docs/dynamixer.md`` section 3.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as v
from ..reference import dynamixer as _ref
from ._define import autocast_args, define_op

__all__ = ["dynamixer_mix"]

_SCHEMA = (
    "(Tensor x, Tensor compress_weight, Tensor compress_bias, Tensor generate_weight, "
    "Tensor generate_bias, int num_head, int reduced_dim) -> Tensor"
)


def _fake(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim):
    # every backend returns a fresh contiguous [B', N, C] tensor, whatever the strides of x
    return x.new_empty(x.shape)


_op = define_op("dynamixer_mix", _SCHEMA, reference=_ref.dynamixer_mix, fake=_fake)


def _validate(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim):
    v.check_tensor("x", x, ndim=3)
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
    _, n, c = x.shape
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
    _validate(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim)
    return _op(
        x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim,
        backend=backend,
    )


dynamixer_mix.op = _op.op
dynamixer_mix.backward_op = _op.backward_op
