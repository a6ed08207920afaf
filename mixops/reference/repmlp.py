"""RepMLPNet's RepMLPBlock, restated literally in PyTorch (the oracle and the ``torch`` backend).

Restates ``DingXiaoH/RepMLP`` @ 3eff13fa0257, ``repmlpnet.py``:

- ``fuse_bn``                         -> ``fuse_bn`` (L25-36)
- ``global_perceptron_forward``       -> ``GlobalPerceptron.forward`` (L39-54)
- ``partition_fc``                    -> ``RepMLPBlock.partition`` + ``partition_affine`` +
                                         the un-partition of ``forward`` (L90-129), deploy fc3
- ``repmlp_block_forward``            -> ``RepMLPBlock.forward`` (L104-129), train and deploy
- ``equivalent_fc3``                  -> ``RepMLPBlock.get_equivalent_fc3`` (L132-153)
- ``locality_injection``              -> ``_convert_conv_to_fc`` (L167-172) plus the final
                                         sum of ``get_equivalent_fc3``

Notation (``docs/repmlp.md``): input ``x [N, C, H, W]``, partition ``(h, w)``, ``hw = h*w``,
``S`` share-sets (channel ``c`` belongs to share-set ``c % S``), ``Q = C // S``,
``hp, wp = H // h, W // w``. fc3 is a grouped 1x1 conv ``[S*hw, hw, 1, 1]``: one ``hw x hw``
FC per share-set. The partition round trip is the official one, including its channel /
partition scramble when ``hp*wp > 1`` and ``S < C`` (docs/repmlp.md section 3.2); it is reproduced, not fixed.

Everything here is dtype-generic (float64 for the oracle) and does no argument checking.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "equivalent_fc3",
    "fuse_bn",
    "global_perceptron_forward",
    "locality_injection",
    "partition_fc",
    "repmlp_block_forward",
]


def _partition(x: torch.Tensor, C: int, h: int, w: int, hp: int, wp: int) -> torch.Tensor:
    """``RepMLPBlock.partition``: ``[N, C, H, W] -> [N, hp, wp, C, h, w]`` (a view when possible)."""
    x = x.reshape(-1, C, hp, h, wp, w)
    return x.permute(0, 2, 4, 1, 3, 5)


def _unpartition(z: torch.Tensor, shape: torch.Size, S: int, h: int, w: int, hp: int, wp: int):
    """The tail of ``RepMLPBlock.forward``: rows of ``[S, h, w]`` maps back to ``shape``.

    The reshape to ``(-1, hp, wp, S, h, w)`` does not undo the partition's ``[.., C, ..]``
    grouping when ``hp*wp > 1`` and ``S < C``: this is the official scramble (docs/repmlp.md section 3.2).
    """
    z = z.reshape(-1, hp, wp, S, h, w)
    z = z.permute(0, 3, 1, 4, 2, 5)  # N, O, h_parts, out_h, w_parts, out_w
    return z.reshape(*shape)


def partition_fc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    partition: Sequence[int],
    num_sharesets: int,
) -> torch.Tensor:
    """The deploy-mode fc3 of a RepMLPBlock on ``x``, un-partitioned, times the
    global-perceptron gate when one is given (``forward``'s ``out * global_vec``).

    x ``[N, C, H, W]``; weight ``[S*hw, hw, 1, 1]``; bias ``[S*hw]`` or None; gate ``[N, C]``
    or None; partition ``(h, w)``; returns ``[N, C, H, W]``.
    """
    h, w = partition
    S = num_sharesets
    C = x.shape[1]
    hp, wp = x.shape[2] // h, x.shape[3] // w
    partitions = _partition(x, C, h, w, hp, wp)
    # partition_affine: every row holds one partition of S consecutive channels
    fc_inputs = partitions.reshape(-1, S * h * w, 1, 1)
    out = F.conv2d(fc_inputs, weight, bias, groups=S)
    out = out.reshape(-1, S, h, w)  # fc3_bn is an Identity in deploy mode
    out = _unpartition(out, x.shape, S, h, w, hp, wp)
    return out if gate is None else out * gate[:, :, None, None]


def _convert_conv_to_fc(kernel: torch.Tensor, bias: torch.Tensor, h: int, w: int):
    """``_convert_conv_to_fc``: the depthwise conv ``kernel [S,1,K,K]`` (zero padding K//2 at
    the partition border) as an FC ``[S*hw, hw]`` and its bias ``[S*hw]``."""
    S = kernel.shape[0]
    # batch p carries a one-hot at position p in every share-set; conv2d of it reads out
    # column p of each share-set's equivalent FC
    eye = torch.eye(h * w, dtype=kernel.dtype, device=kernel.device)
    ident = eye.repeat(1, S).reshape(h * w, S, h, w)
    fc_k = F.conv2d(ident, kernel, padding=(kernel.size(2) // 2, kernel.size(3) // 2), groups=S)
    fc_k = fc_k.reshape(h * w, S * h * w).t()
    fc_bias = bias.repeat_interleave(h * w)
    return fc_k, fc_bias


def locality_injection(
    fc_weight: torch.Tensor,
    fc_bias: Optional[torch.Tensor],
    kernel: torch.Tensor,
    kernel_bias: Optional[torch.Tensor],
    partition: Sequence[int],
):
    """fc3 plus the FC equivalent of a (BN-fused) depthwise conv branch.

    fc_weight ``[S*hw, hw, 1, 1]`` (or ``[S*hw, hw]``); fc_bias ``[S*hw]`` or None (zero);
    kernel ``[S, 1, K, K]``, K odd; kernel_bias ``[S]`` or None (zero); partition ``(h, w)``.
    Returns ``(weight like fc_weight, bias [S*hw])``.
    """
    h, w = partition
    S = kernel.shape[0]
    if kernel_bias is None:
        kernel_bias = kernel.new_zeros(S)
    if fc_bias is None:
        fc_bias = fc_weight.new_zeros(S * h * w)
    rep_weight, rep_bias = _convert_conv_to_fc(kernel, kernel_bias, h, w)
    weight = rep_weight.reshape_as(fc_weight) + fc_weight
    # the sum inherits the transposed layout of rep_weight; a custom op needs a fixed one
    return weight.contiguous(), rep_bias + fc_bias


def fuse_bn(weight: torch.Tensor, bn: nn.BatchNorm2d):
    """``fuse_bn(conv_or_fc, bn)`` with the layer's weight: the weight and bias of layer + BN
    (eval mode: running statistics and ``bn.eps``).

    For a conv branch (``weight.size(0) == len(bn)``) each output channel uses its own BN
    channel; for fc3 (``weight.size(0) == S*hw``) rows ``s*hw .. s*hw+hw-1`` use BN channel s.
    """
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    t = t.reshape(-1, 1, 1, 1)
    shift = bn.bias - bn.running_mean * bn.weight / std
    if len(t) == weight.size(0):
        return weight * t, shift
    repeat_times = weight.size(0) // len(t)
    return weight * t.repeat_interleave(repeat_times, 0), shift.repeat_interleave(repeat_times, 0)


def global_perceptron_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GlobalPerceptron.forward``: the sigmoid channel gate ``[N, C, 1, 1]`` of ``x``."""
    v = F.adaptive_avg_pool2d(x, output_size=(1, 1))
    v = F.conv2d(v, m.fc1.weight, m.fc1.bias)
    v = F.relu(v)
    v = F.conv2d(v, m.fc2.weight, m.fc2.bias)
    v = torch.sigmoid(v)
    return v.view(-1, m.input_channels, 1, 1)


def _norm(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """What ``bn(x)`` returns, without touching its buffers (the oracle is a pure function).

    A BatchNorm in training mode normalises with the batch statistics, in eval mode with
    the running ones; an Identity (deploy fc3_bn) passes through.
    """
    if isinstance(bn, nn.Identity):
        return x
    if bn.training or bn.running_mean is None:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def repmlp_block_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``RepMLPBlock.forward`` from the parameters of block ``m``: ``[N, C, H, W] -> same``.

    Train mode (``m.deploy`` False): fc3 (no bias) + fc3_bn + the ``repconv{k}`` branches on
    the partition maps (zero padding at partition borders); deploy: fc3 with its bias. Then
    the un-partition and the global-perceptron gate. Running statistics are not updated.
    """
    global_vec = global_perceptron_forward(m.gp, x)
    S, h, w = m.S, m.h, m.w
    shape = x.shape
    hp, wp = shape[2] // h, shape[3] // w
    partitions = _partition(x, m.C, h, w, hp, wp)

    fc_inputs = partitions.reshape(-1, S * h * w, 1, 1)
    fc3_out = F.conv2d(fc_inputs, m.fc3.weight, m.fc3.bias, groups=S)
    fc3_out = _norm(fc3_out.reshape(-1, S, h, w), m.fc3_bn)
    fc3_out = fc3_out.reshape(-1, hp, wp, S, h, w)

    if m.reparam_conv_k is not None and not m.deploy:
        conv_inputs = partitions.reshape(-1, S, h, w)
        conv_out = 0
        for k in m.reparam_conv_k:
            branch = getattr(m, f"repconv{k}")
            y = F.conv2d(conv_inputs, branch.conv.weight, None, padding=k // 2, groups=S)
            conv_out = conv_out + _norm(y, branch.bn)
        fc3_out = fc3_out + conv_out.reshape(-1, hp, wp, S, h, w)

    out = _unpartition(fc3_out, shape, S, h, w, hp, wp)
    return out * global_vec


def equivalent_fc3(m: nn.Module):
    """``get_equivalent_fc3`` of a train-mode block: ``(weight [S*hw, hw, 1, 1], bias [S*hw])``.

    fc3 fused with fc3_bn, plus every ``repconv{k}`` fused with its BN, zero-padded to the
    largest k, summed and converted to an FC (``locality_injection``).
    """
    fc_weight, fc_bias = fuse_bn(m.fc3.weight, m.fc3_bn)
    if m.reparam_conv_k is None:
        return fc_weight, fc_bias
    largest_k = max(m.reparam_conv_k)
    largest = getattr(m, f"repconv{largest_k}")
    total_kernel, total_bias = fuse_bn(largest.conv.weight, largest.bn)
    for k in m.reparam_conv_k:
        if k != largest_k:
            branch = getattr(m, f"repconv{k}")
            kernel, bias = fuse_bn(branch.conv.weight, branch.bn)
            total_kernel = total_kernel + F.pad(kernel, [(largest_k - k) // 2] * 4)
            total_bias = total_bias + bias
    return locality_injection(fc_weight, fc_bias, total_kernel, total_bias, (m.h, m.w))
