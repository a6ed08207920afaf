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

from .uniformer import Attention, DropPath, Mlp, _check_input

__all__ = ["Attention", "Mlp", "SABlock"]


class SABlock(nn.Module):
    """Global spatiotemporal self-attention block, NCTHW in and out."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.pos_embed = nn.Conv3d(dim, dim, (3, 3, 3), (1, 1, 1), (1, 1, 1), groups=dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
            attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, T, H, W]`` -> ``[B, C, T, H, W]``; attention over all T*H*W tokens."""
        _check_input(x, self.pos_embed.in_channels, 5, "[B, C, T, H, W]")
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 4, 1)
        x = x + self.drop_path(self.attn.forward_grid(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        # the official ends with transpose(1, 2).reshape: a contiguous NCTHW copy
        return x.permute(0, 4, 1, 2, 3).contiguous()
