"""Drop-in UniFormer video attention block: the 3-D ``SABlock``.

Same class name, constructor, children and registration order as the ``SABlock`` of
``Sense-X/UniFormer:video_classification/slowfast/models/uniformer.py``: a 3x3x3 depthwise
DPE, then global attention over all T*H*W tokens (the official video model has no windows),
then the MLP. ``Attention`` and ``Mlp`` are the 2-D ones (the official classes are identical).
The LayerNorm eps note of ``mixops.nn.uniformer`` applies (the official model passes 1e-6).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .uniformer import Attention, Mlp, _check_input, init_block, mix_tokens

__all__ = ["Attention", "Mlp", "SABlock"]


class SABlock(nn.Module):
    """Global spatiotemporal self-attention block, NCTHW in and out."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        init_block(self, nn.Conv3d(dim, dim, (3, 3, 3), (1, 1, 1), (1, 1, 1), groups=dim), dim, num_heads,
                   mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path, act_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, T, H, W]`` -> ``[B, C, T, H, W]``; attention over all T*H*W tokens."""
        _check_input(x, self.pos_embed.in_channels, 5, "[B, C, T, H, W]")
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 4, 1)
        x = mix_tokens(self, x)
        # the official ends with transpose(1, 2).reshape: a contiguous NCTHW copy
        return x.permute(0, 4, 1, 2, 3).contiguous()
