"""DynaMixer, restated literally: the DynaMixerOp token mixing and the DynaMixerBlock around it.

Restates ``ziyuwwang/DynaMixer`` @ 038b73b2f700, ``models/dynamixer.py`` (DynaMixerOp.forward,
L8-29; DynaMixerBlock.forward, L32-58) and ``models/utils.py`` (Mlp.forward, L20-36), in the
official sequence of operations. See ``docs/dynamixer.md`` section 3.

Shapes (S = num_head, d = reduced_dim, N = sequence length, C = channels):

- ``dynamixer_mix``: x ``[B', N, C]`` -> contiguous y ``[B', N, C]`` (before ``out``);
  compress Linear(C, S*d) with segment-major output ``s*d + k``; generate Linear(N*d, N*N)
  with token-major input ``l*d + k``, shared by all segments; logits ``[B', S, N, N]``
  softmaxed over dim -2 (the source token); segment s mixes channels ``[s*C/S, (s+1)*C/S)``.
- ``dynamixer_axis_mix``: ``dynamixer_mix`` of the rows (axis "w") or the columns (axis "h")
  of a channels-last ``[B, H, W, C]`` map, returned in the map's layout: the mixing of the
  block's ``mix_w`` / ``mix_h`` before their ``out`` Linear.
- ``dynamixer_reweighted``: the block's reweighted branch sum before ``proj``,
  ``h*a0 + w*a1 + c*a2`` with ``h = out_h(y_h)``, ``w = out_w(y_w)``, ``c = mlp_c(x)``.
- ``dynamixer_op_forward``: ``out(dynamixer_mix(x))`` for a DynaMixerOp module.
- ``dynamixer_block_forward``: x ``[B, H, W, C]`` channels-last -> ``[B, H, W, C]``.

Everything is dtype-generic (float64 for the oracle) and free of validation and custom ops:
these functions are the ``torch`` backend of ``mixops.dynamixer_mix`` and the ``official``
baseline of the benchmarks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import branch_weights, mlp_forward

__all__ = [
    "dynamixer_axis_mix",
    "dynamixer_block_forward",
    "dynamixer_mix",
    "dynamixer_op_forward",
    "dynamixer_reweighted",
    "mlp_forward",
]


def dynamixer_mix(
    x: torch.Tensor,
    compress_weight: torch.Tensor,
    compress_bias: torch.Tensor,
    generate_weight: torch.Tensor,
    generate_bias: torch.Tensor,
    num_head: int,
    reduced_dim: int,
) -> torch.Tensor:
    """DynaMixerOp.forward up to (not including) ``out``: x ``[B', N, C]`` -> ``[B', N, C]``."""
    B, L, C = x.shape
    # compress -> [B', L, S, d] -> [B', S, L, d] -> [B', S, L*d]: token-major generate input.
    # Explicit L*d instead of -1 so that an empty batch (B' = 0) still reshapes.
    logits = F.linear(x, compress_weight, compress_bias)
    logits = logits.reshape(B, L, num_head, reduced_dim).permute(0, 2, 1, 3).reshape(B, num_head, L * reduced_dim)
    logits = F.linear(logits, generate_weight, generate_bias).reshape(B, num_head, L, L)
    # normalise over the source token p of the flat logit index p*L + q
    mixing = torch.softmax(logits, dim=-2)
    # contiguous channel segments: [B', L, S, C/S] -> [B', S, C/S, L]; then (C/S x L) @ (L x L)
    segments = x.reshape(B, L, num_head, C // num_head).permute(0, 2, 3, 1)
    mixed = torch.matmul(segments, mixing)
    # The reshape is a view with strides (L*C, 1, L); the op's output is contiguous so that
    # every backend and the fake kernel agree. The copy is the one the official ``out`` Linear
    # makes of this view anyway, moved earlier.
    return mixed.permute(0, 3, 1, 2).reshape(B, L, C).contiguous()


def dynamixer_axis_mix(
    x: torch.Tensor,
    compress_weight: torch.Tensor,
    compress_bias: torch.Tensor,
    generate_weight: torch.Tensor,
    generate_bias: torch.Tensor,
    num_head: int,
    reduced_dim: int,
    axis: str,
) -> torch.Tensor:
    """``dynamixer_mix`` along ``axis`` of x ``[B, H, W, C]`` -> ``[B, H, W, C]``: "w" mixes each
    row (sequences in batch order (b, h)), "h" each column (batch order (b, w)), as the
    official DynaMixerBlock feeds ``mix_w`` and ``mix_h``."""
    B, H, W, C = x.shape
    args = (compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim)
    if axis == "w":
        return dynamixer_mix(x.reshape(B * H, W, C), *args).reshape(B, H, W, C)
    y = dynamixer_mix(x.permute(0, 2, 1, 3).reshape(B * W, H, C), *args)
    return y.reshape(B, W, H, C).permute(0, 2, 1, 3)


def dynamixer_reweighted(
    mixed_h: torch.Tensor,
    mixed_w: torch.Tensor,
    x: torch.Tensor,
    weight_h: torch.Tensor,
    weight_w: torch.Tensor,
    weight_c: torch.Tensor,
    bias_h: Optional[torch.Tensor],
    bias_w: Optional[torch.Tensor],
    bias_c: Optional[torch.Tensor],
    alpha: torch.Tensor,
) -> torch.Tensor:
    """DynaMixerBlock's reweighted branch sum before ``proj``: ``h*a0 + w*a1 + c*a2`` in the
    official add order, with ``h = mixed_h @ weight_h.T + bias_h`` (``mix_h.out``), w likewise
    (``mix_w.out``), ``c = x @ weight_c.T + bias_c`` (``mlp_c``) and alpha ``[B, C, 3]`` (branch
    order h, w, c) broadcast over the tokens of each sample. ``[B, H, W, C]`` maps."""
    h = F.linear(mixed_h, weight_h, bias_h)
    w = F.linear(mixed_w, weight_w, bias_w)
    c = F.linear(x, weight_c, bias_c)
    a = alpha[:, None, None].to(h.dtype)
    return h * a[..., 0] + w * a[..., 1] + c * a[..., 2]


def dynamixer_op_forward(m, x: torch.Tensor) -> torch.Tensor:
    """DynaMixerOp.forward of module ``m`` on x ``[B', N, C]``: the mixing, then ``out``."""
    y = dynamixer_mix(
        x,
        m.compress.weight,
        m.compress.bias,
        m.generate.weight,
        m.generate.bias,
        m.num_head,
        m.reduced_dim,
    )
    return F.linear(y, m.out.weight, m.out.bias)


def dynamixer_block_forward(m, x: torch.Tensor) -> torch.Tensor:
    """DynaMixerBlock.forward of module ``m`` on channels-last x ``[B, H, W, C]``."""
    B, H, W, C = x.shape
    # mix_h: the sequences are the columns, in batch order (b, w)
    h = dynamixer_op_forward(m.mix_h, x.permute(0, 2, 1, 3).reshape(-1, H, C))
    h = h.reshape(B, W, H, C).permute(0, 2, 1, 3)
    # mix_w: the sequences are the rows, in batch order (b, h)
    w = dynamixer_op_forward(m.mix_w, x.reshape(-1, W, C)).reshape(B, H, W, C)
    c = F.linear(x, m.mlp_c.weight, m.mlp_c.bias)

    a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
    # reweight output index 3c + k, branch k in order (h, w, c), softmax over k
    a = branch_weights(m.reweight, a, 3)
    a = a.unsqueeze(2).unsqueeze(2)

    y = h * a[0] + w * a[1] + c * a[2]
    y = F.linear(y, m.proj.weight, m.proj.bias)
    return F.dropout(y, m.proj_drop.p, m.training)
