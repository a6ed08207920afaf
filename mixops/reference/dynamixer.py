"""DynaMixer, restated literally: the DynaMixerOp token mixing and the DynaMixerBlock around it.

Restates ``ziyuwwang/DynaMixer`` @ 038b73b2f700, ``models/dynamixer.py`` (DynaMixerOp.forward,
L8-29; DynaMixerBlock.forward, L32-58) and ``models/utils.py`` (Mlp.forward, L20-36), in the
official sequence of operations. See ``docs/dynamixer.md`` section 3.

Shapes (S = num_head, d = reduced_dim, N = sequence length, C = channels):

- ``dynamixer_mix``: x ``[B', N, C]`` -> contiguous y ``[B', N, C]`` (before ``out``);
  compress Linear(C, S*d) with segment-major output ``s*d + k``; generate Linear(N*d, N*N)
  with token-major input ``l*d + k``, shared by all segments; logits ``[B', S, N, N]``
  softmaxed over dim -2 (the source token); segment s mixes channels ``[s*C/S, (s+1)*C/S)``.
- ``dynamixer_op_forward``: ``out(dynamixer_mix(x))`` for a DynaMixerOp module.
- ``dynamixer_block_forward``: x ``[B, H, W, C]`` channels-last -> ``[B, H, W, C]``.

Everything is dtype-generic (float64 for the oracle) and free of validation and custom ops:
these functions are the ``torch`` backend of ``mixops.dynamixer_mix`` and the ``official``
baseline of the benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import branch_weights, mlp_forward

__all__ = [
    "dynamixer_block_forward",
    "dynamixer_mix",
    "dynamixer_op_forward",
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
