"""RepMLP's public ops: the set-sharing partition FC and the conv -> FC locality injection.

``mixops.partition_fc`` is the deploy-mode fc3 of a RepMLPBlock, optionally with the
global-perceptron gate applied to its output (one kernel on the Triton backend);
``mixops.locality_injection`` folds a depthwise conv branch into such an FC. Semantics:
``mixops.reference.repmlp`` and ``docs/repmlp.md``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _validate as v
from ..reference import repmlp as _ref
from ._define import autocast_args, define_op

__all__ = ["locality_injection", "partition_fc"]


def _fake_partition_fc(x, weight, bias, gate, partition, num_sharesets):
    return x.new_empty(x.shape)


def _fake_locality_injection(fc_weight, fc_bias, kernel, kernel_bias, partition):
    return fc_weight.new_empty(fc_weight.shape), fc_weight.new_empty(fc_weight.shape[0])


_partition_fc = define_op(
    "partition_fc",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? gate, int[] partition, int num_sharesets) -> Tensor",
    reference=_ref.partition_fc,
    fake=_fake_partition_fc,
)

_locality_injection = define_op(
    "locality_injection",
    "(Tensor fc_weight, Tensor? fc_bias, Tensor kernel, Tensor? kernel_bias, int[] partition)"
    " -> (Tensor, Tensor)",
    reference=_ref.locality_injection,
    fake=_fake_locality_injection,
)


def _check_partition(partition: object) -> tuple[int, int]:
    """``partition`` is a pair of positive ints ``(h, w)``."""
    if not isinstance(partition, (tuple, list)) or len(partition) != 2:
        raise TypeError(f"partition must be a pair of ints (h, w), got {partition!r}")
    h = v.check_int("partition[0] (h)", partition[0])
    w = v.check_int("partition[1] (w)", partition[1])
    return h, w


def _check_fc_weight(name: str, weight: torch.Tensor, S: int, hw: int) -> None:
    """An fc3 weight: ``[S*hw, hw, 1, 1]`` or its 2-D form ``[S*hw, hw]``."""
    v.check_tensor(name, weight, ndim=(2, 4))
    expected = (S * hw, hw) if weight.dim() == 2 else (S * hw, hw, 1, 1)
    v.check_shape(name, weight, expected)


def partition_fc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    partition: Sequence[int],
    num_sharesets: int,
    gate: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """RepMLP's set-sharing partition FC (the deploy fc3 of a RepMLPBlock), optionally gated.

    Args:
        x: ``[N, C, H, W]``, with ``H % h == 0``, ``W % w == 0`` and ``C % S == 0``.
        weight: fc3.weight ``[S*hw, hw, 1, 1]`` (or ``[S*hw, hw]``): the FC of share-set s
            is rows ``s*hw .. s*hw+hw-1``; channel c uses share-set ``c % S``.
        bias: fc3.bias ``[S*hw]`` or None.
        partition: ``(h, w)``, ``hw = h*w``.
        num_sharesets: S.
        gate: None, or the global perceptron's output ``[N, C, 1, 1]`` (or ``[N, C]``): the
            result is multiplied by it per (image, output channel), as RepMLPBlock's
            ``out * global_vec``; differentiable.
        backend: ``mixops.backend`` choice (None: context / environment / auto).

    Returns:
        ``[N, C, H, W]``. With one partition per map (``H == h``, ``W == w``) or ``S == C``,
        ``out[n, c] = W_{c%S} @ vec(x[n, c]) + b_{c%S}`` per partition; otherwise the output
        carries the official channel/partition scramble (docs/repmlp.md section 3.2), reproduced on purpose;
        the gate is indexed by the output channel.
    """
    x, weight, bias, gate = autocast_args("lower", x, weight, bias, gate)
    v.check_tensor("x", x, ndim=4)
    h, w = _check_partition(partition)
    S = v.check_int("num_sharesets", num_sharesets)
    _, C, H, W = x.shape
    v.check_divisible("x channels (C)", C, "num_sharesets", S)
    v.check_divisible("x height (H)", H, "partition height h", h)
    v.check_divisible("x width (W)", W, "partition width w", w)
    _check_fc_weight("weight", weight, S, h * w)
    v.check_like("weight", weight, "x", x)
    v.check_optional("bias", bias, "x", x, (S * h * w,))
    if gate is not None:
        v.check_tensor("gate", gate, ndim=(2, 4))
        v.check_shape("gate", gate, (x.shape[0], C) if gate.dim() == 2 else (x.shape[0], C, 1, 1))
        v.check_like("gate", gate, "x", x)
        gate = gate.reshape(gate.shape[0], C)
    if weight.dim() == 2:
        weight = weight.reshape(S * h * w, h * w, 1, 1)
    return _partition_fc(x, weight, bias, gate, [h, w], S, backend=backend)


def locality_injection(
    fc_weight: torch.Tensor,
    fc_bias: Optional[torch.Tensor],
    kernel: torch.Tensor,
    kernel_bias: Optional[torch.Tensor],
    *,
    partition: Sequence[int],
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN-fused depthwise conv branch into an FC (RepMLP's ``_convert_conv_to_fc`` + sum).

    Args:
        fc_weight: ``[S*hw, hw, 1, 1]`` (or ``[S*hw, hw]``), e.g. fc3 fused with fc3_bn.
        fc_bias: ``[S*hw]`` or None (zero).
        kernel: ``[S, 1, K, K]``, K odd: a depthwise conv applied to each ``h x w`` partition
            with zero padding ``K//2`` at the partition border.
        kernel_bias: ``[S]`` or None (zero).
        partition: ``(h, w)``, ``hw = h*w``.
        backend: ``mixops.backend`` choice.

    Returns:
        ``(weight, bias)``: weight shaped like ``fc_weight``, bias ``[S*hw]``, with
        ``weight[s*hw + q, p] = fc_weight[s*hw + q, p] + kernel[s, 0, py-qy+K//2, px-qx+K//2]``
        (zero outside the kernel) and ``bias[s*hw + q] = fc_bias[s*hw + q] + kernel_bias[s]``.
        Differentiable in all tensors.
    """
    fc_weight, fc_bias, kernel, kernel_bias = autocast_args("lower", fc_weight, fc_bias, kernel, kernel_bias)
    v.check_tensor("kernel", kernel, ndim=4)
    h, w = _check_partition(partition)
    S, one, K, K2 = kernel.shape
    if S < 1 or one != 1 or K != K2 or K % 2 == 0:
        raise ValueError(
            f"kernel must have shape [S, 1, K, K] with K odd, got {tuple(kernel.shape)}"
        )
    _check_fc_weight("fc_weight", fc_weight, S, h * w)
    v.check_like("fc_weight", fc_weight, "kernel", kernel)
    v.check_optional("fc_bias", fc_bias, "kernel", kernel, (S * h * w,))
    v.check_optional("kernel_bias", kernel_bias, "kernel", kernel, (S,))
    return _locality_injection(fc_weight, fc_bias, kernel, kernel_bias, [h, w], backend=backend)
