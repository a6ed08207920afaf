"""Drop-in DynaMixer modules: ``Mlp``, ``DynaMixerOp`` and ``DynaMixerBlock``.

Same class names, constructor arguments, child names and registration order as
``ziyuwwang/DynaMixer`` ``models/dynamixer.py`` and ``models/utils.py``, so an official
state_dict loads with ``strict=True``. The token mixing runs through ``mixops.dynamixer_mix``
(and therefore through the selected backend); the Linears, reweighting and dropout are plain
torch. Semantics: ``docs/dynamixer.md``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._validate import check_tensor
from ..ops.dynamixer import dynamixer_mix
from ._layers import Mlp, reweighted_sum

__all__ = ["DynaMixerBlock", "DynaMixerOp", "Mlp"]


class DynaMixerOp(nn.Module):
    """Dynamic mixing of the ``seq_len`` tokens of each sequence, then ``out``.

    Parameters (state_dict order): ``out`` Linear(dim, dim), ``compress`` Linear(dim,
    num_head*reduced_dim), ``generate`` Linear(seq_len*reduced_dim, seq_len**2). The
    parameter-free ``activation`` (Softmax over dim -2) is kept for structural parity with the
    official module; the softmax itself runs inside ``mixops.dynamixer_mix``.

    forward: x ``[B', seq_len, dim]`` -> ``[B', seq_len, dim]``.
    """

    def __init__(self, dim, seq_len, num_head, reduced_dim=2):
        super().__init__()
        self.dim = dim
        self.seq_len = seq_len
        self.num_head = num_head
        self.reduced_dim = reduced_dim
        self.out = nn.Linear(dim, dim)
        self.compress = nn.Linear(dim, num_head * reduced_dim)
        self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)
        self.activation = nn.Softmax(dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        if x.shape[1] != self.seq_len or x.shape[2] != self.dim:
            # generate is sized by seq_len: other sequence lengths cannot be mixed
            raise ValueError(
                f"x must have shape [B', {self.seq_len}, {self.dim}] (seq_len, dim), "
                f"got {tuple(x.shape)}"
            )
        y = dynamixer_mix(
            x,
            self.compress.weight,
            self.compress.bias,
            self.generate.weight,
            self.generate.bias,
            num_head=self.num_head,
            reduced_dim=self.reduced_dim,
        )
        return self.out(y)


class DynaMixerBlock(nn.Module):
    """H-mixing + W-mixing + channel FC, reweighted per channel (order h, w, c), then ``proj``.

    Children: ``mix_h`` (mixes along H: the sequences are columns), ``mix_w`` (along W: rows),
    ``mlp_c`` (Linear(dim, dim, bias=qkv_bias)), ``reweight`` (Mlp(dim, dim//4, 3*dim)),
    ``proj``, ``proj_drop``. ``qk_scale`` and ``attn_drop`` are accepted and unused, as in the
    official module.

    forward: channels-last x ``[B, H, W, dim]`` with H == W == resolution -> same shape.
    """

    def __init__(self, dim, resolution=32, num_head=8, reduced_dim=2, qkv_bias=False, qk_scale=None,
                 attn_drop=0., proj_drop=0.):
        super().__init__()
        self.resolution = resolution
        self.num_head = num_head
        self.mix_h = DynaMixerOp(dim, resolution, num_head, reduced_dim=reduced_dim)
        self.mix_w = DynaMixerOp(dim, resolution, num_head, reduced_dim=reduced_dim)
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, ndim=4)
        B, H, W, C = x.shape
        if H != self.resolution or W != self.resolution:
            # both mixers' generate Linears are sized by resolution
            raise ValueError(
                f"x must have H == W == resolution ({self.resolution}), got shape {tuple(x.shape)}"
            )
        h = self.mix_h(x.permute(0, 2, 1, 3).reshape(B * W, H, C)).reshape(B, W, H, C).permute(0, 2, 1, 3)
        w = self.mix_w(x.reshape(B * H, W, C)).reshape(B, H, W, C)
        c = self.mlp_c(x)

        # branch order (h, w, c): reweight output 3c + k weighs branch k of channel c
        return self.proj_drop(self.proj(reweighted_sum(self.reweight, [h, w, c])))
