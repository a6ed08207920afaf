"""Drop-in UniFormer (2-D) attention blocks: ``Mlp``, ``Attention``, ``SABlock``, ``SABlock_Windows``.

Same class names, constructor arguments, defaults, children and registration order as
``Sense-X/UniFormer:object_detection/mmdet/models/backbones/uniformer.py``, so official
state_dicts load with ``strict=True``. ``SABlock`` and ``SABlock_Windows`` have identical
parameters: a global-trained block loads into a windowed one unchanged.

The attention core runs through ``mixops.window_attention`` (so the selected backend applies);
the qkv Linear, proj, DPE, LayerNorms and MLP are plain torch.

LayerNorm eps: like the official classes, ``norm_layer`` defaults to ``nn.LayerNorm``
(eps 1e-5); the official backbones always pass ``partial(nn.LayerNorm, eps=1e-6)``. Pass that
too to reproduce a backbone block (eps has no parameter, so checkpoints load either way).

Attention dropout (``attn_drop > 0`` in training) has no place in the fused op; every
official config uses 0, and such a module raises ValueError in training mode.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .._validate import check_tensor
from ..ops.window_attention import window_attention
from ._layers import DropPath, Mlp

__all__ = ["DropPath", "Mlp", "Attention", "SABlock", "SABlock_Windows"]


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear, softmax(q k^T * scale) v per head, proj Linear.

    ``forward(x)``: ``[B, N, C]`` -> ``[B, N, C]``, global over the N tokens (official API).
    ``forward_grid(x, window_size)``: ``[B, H, W, C]`` (or ``[B, T, H, W, C]``, global only)
    -> same shape; windowed when ``window_size`` is an int, with UniFormer's bias padding.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        return self.forward_grid(x.unsqueeze(1)).squeeze(1)

    def forward_grid(self, x: torch.Tensor, window_size: Optional[int] = None) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:
            raise ValueError(
                f"attn_drop must be 0 in training: mixops.window_attention has no attention "
                f"dropout, got attn_drop={self.attn_drop.p}"
            )
        dim = self.proj.in_features
        if x.shape[-1] != dim:
            raise ValueError(f"x must have {dim} channels in its last dimension, got shape {tuple(x.shape)}")
        qkv = self.qkv(x)
        bias = self.qkv.bias
        # under autocast the Linear output is half while its bias stays float32; the official
        # padded tokens (zero rows through the same Linear) carry the bias in the output dtype
        if bias is not None:
            bias = bias.to(qkv.dtype)
        out = window_attention(
            qkv, num_heads=self.num_heads, window_size=window_size, scale=self.scale, qkv_bias=bias
        )
        return self.proj_drop(self.proj(out))


def _check_input(x: torch.Tensor, dim: int, ndim: int, layout: str) -> None:
    check_tensor("x", x, ndim=ndim)
    if x.shape[1] != dim:
        raise ValueError(f"x must be {layout} with C = {dim}, got shape {tuple(x.shape)}")


def init_block(block, pos_embed, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, drop_path,
               act_layer, norm_layer) -> None:
    """Register the children of UniFormer's SABlock family, in the official order:
    pos_embed, norm1, attn, drop_path, norm2, mlp (the state_dict keys follow it)."""
    block.pos_embed = pos_embed
    block.norm1 = norm_layer(dim)
    block.attn = Attention(
        dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
    block.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
    block.norm2 = norm_layer(dim)
    block.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)


def mix_tokens(block, x: torch.Tensor, window_size: Optional[int] = None) -> torch.Tensor:
    """The two residual branches of a block on channels-last ``x`` (after the DPE)."""
    x = x + block.drop_path(block.attn.forward_grid(block.norm1(x), window_size))
    return x + block.drop_path(block.mlp(block.norm2(x)))


class SABlock(nn.Module):
    """Global self-attention block, NCHW in and out: DPE, LN, attention, residual, LN, MLP, residual."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        init_block(self, nn.Conv2d(dim, dim, 3, padding=1, groups=dim), dim, num_heads, mlp_ratio, qkv_bias,
                   qk_scale, drop, attn_drop, drop_path, act_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, H, W]`` -> ``[B, C, H, W]``; attention over all H*W tokens."""
        _check_input(x, self.pos_embed.in_channels, 4, "[B, C, H, W]")
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = mix_tokens(self, x)
        # the official ends with transpose(1, 2).reshape: a contiguous NCHW copy
        return x.permute(0, 3, 1, 2).contiguous()


class SABlock_Windows(nn.Module):
    """Windowed self-attention block (ws x ws windows, bias-padded edges), NCHW in and out.

    Parameters identical to ``SABlock``; ``window_size`` is the only extra argument.
    """

    def __init__(self, dim, num_heads, window_size=14, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0.,
                 attn_drop=0., drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.window_size = window_size
        init_block(self, nn.Conv2d(dim, dim, 3, padding=1, groups=dim), dim, num_heads, mlp_ratio, qkv_bias,
                   qk_scale, drop, attn_drop, drop_path, act_layer, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, H, W]`` -> ``[B, C, H, W]``; any H, W (edge windows are bias-padded)."""
        _check_input(x, self.pos_embed.in_channels, 4, "[B, C, H, W]")
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        x = mix_tokens(self, x, self.window_size)
        # the official returns permute(0, 3, 1, 2).reshape(B, C, H, W): a channels-last view
        return x.permute(0, 3, 1, 2).reshape(B, C, H, W)
