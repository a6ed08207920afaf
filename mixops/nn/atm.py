"""Drop-in ActiveMLP modules (``microsoft/ActiveMLP:models/activemlp.py``): ``ATMOp``,
``ATMLayer``, ``Mlp``, ``ActiveBlock``, ``Downsample``, ``PEG``.

Same class names, constructor arguments, defaults, parameter names and registration order as the
official classes, so official state_dicts load with ``strict=True``. The ATM gathers + FCs run
through ``mixops.atm_fc`` (and so through the selected backend); the rest is plain torch.
``ATMLayer`` takes the fused path of ``mixops.ops.atm_layer`` (two passes over x: token means,
then one reweighted K = 3C gather-GEMM; no branch output in HBM) when the backend ``atm_fc``
resolves to implements its internal ops (torch, triton), else the unfused path above.

Offsets between blocks keep the official ``[B,2C,H,W]`` format (a permuted view of the
``repeat_interleave``'d ``offset_layer`` output). ``ATMLayer.forward_compact`` takes the compact
channels-last offsets ``[B,H,W,C/share]`` instead; an offset-generating ``ActiveBlock`` uses it
for its own layer, and still returns the official offset for the blocks that reuse it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from .. import _validate as v
from ..ops.atm import atm_fc
from ..ops.atm_layer import atm_layer_mix, fused_backend
from ._layers import DropPath, Mlp, reweighted_sum

__all__ = ["ATMLayer", "ATMOp", "ActiveBlock", "Downsample", "DropPath", "Mlp", "PEG"]


class ATMOp(nn.Module):
    """One directional ATM: 1-D deformable gather along ``dimension`` + dense 1x1 conv.

    ``weight [out_chans, in_chans, 1, 1]``, ``bias [out_chans]``.
    ``forward(input [B,C,H,W], offset [B,C,H,W]) -> [B,out_chans,H,W]``.

    Only the configuration every official model uses runs: stride 1 and padding 0 (any other
    makes the official ``[B,2C,H,W]`` offset tensor mismatch deform_conv2d's output grid, so
    they raise ValueError). A 1x1 kernel never reads a dilated tap, so ``dilation`` is accepted
    and changes nothing. ``dimension`` other than 'h'/'w' raises ValueError in forward (the
    official raises NotImplementedError there).
    """

    def __init__(self, in_chans, out_chans, stride: int = 1, padding: int = 0, dilation: int = 1,
                 bias: bool = True, dimension: str = ""):
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = out_chans
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.dimension = dimension

        self.weight = nn.Parameter(torch.empty(out_chans, in_chans, 1, 1))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_chans))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        v.check_choice("dimension", self.dimension, ("h", "w"))
        if self.stride != (1, 1):
            raise ValueError(f"stride must be 1 for ATMOp (official models use 1), got {self.stride}")
        if self.padding != (0, 0):
            raise ValueError(f"padding must be 0 for ATMOp (official models use 0), got {self.padding}")
        v.check_tensor("input", input, ndim=4)
        B, C, H, W = input.shape
        if C != self.in_chans:
            raise ValueError(
                f"input must have in_chans={self.in_chans} channels, got shape {tuple(input.shape)}"
            )
        v.check_tensor("offset", offset, ndim=4)
        v.check_shape("offset", offset, (B, C, H, W))
        out = atm_fc(
            input.permute(0, 2, 3, 1), offset.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias,
            axis=self.dimension,
        )
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        bias = ", bias=False" if self.bias is None else ""
        return (f"dimension={self.dimension}, in_chans={self.in_chans}, out_chans={self.out_chans}, "
                f"stride={self.stride}{bias}")


class ATMLayer(nn.Module):
    """Active Token Mixer: W, H and channel branches reweighted per channel, then ``proj``.

    ``forward(x [B,H,W,C], offset [B,2C,H,W]) -> [B,H,W,C]``; ``offset[:, :C]`` drives the W
    branch and ``offset[:, C:]`` the H branch (per-channel offsets, share 1).
    """

    def __init__(self, dim, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.atm_c = nn.Linear(dim, dim, bias=False)
        self.atm_h = ATMOp(dim, dim, dimension="h")
        self.atm_w = ATMOp(dim, dim, dimension="w")
        self.fusion = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check_x(self, x: torch.Tensor) -> None:
        v.check_tensor("x", x, ndim=4)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B,H,W,{self.dim}] (channels-last), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        B, H, W, C = x.shape
        v.check_tensor("offset", offset, ndim=4)
        v.check_shape("offset", offset, (B, 2 * C, H, W))
        off = offset.permute(0, 2, 3, 1)  # a view: [B,H,W,2C]
        return self.forward_compact(x, off[..., :C], off[..., C:], share=1)

    def forward_compact(self, x: torch.Tensor, offset_w: torch.Tensor, offset_h: torch.Tensor,
                        share: int = 1) -> torch.Tensor:
        """The same layer with compact channels-last offsets ``offset_w``, ``offset_h``
        ``[B,H,W,C/share]`` (channel ``c`` uses ``c // share``) for the W and H branches."""
        self._check_x(x)
        backend = fused_backend(x)
        if backend is not None:
            y = atm_layer_mix(
                x, offset_w, offset_h, share,
                self.atm_w.weight.flatten(1), self.atm_w.bias,
                self.atm_h.weight.flatten(1), self.atm_h.bias,
                self.atm_c.weight, self.fusion, backend,
            )
            return self.proj_drop(self.proj(y))
        w = atm_fc(x, offset_w, self.atm_w.weight.flatten(1), self.atm_w.bias, axis="w", share=share)
        h = atm_fc(x, offset_h, self.atm_h.weight.flatten(1), self.atm_h.bias, axis="h", share=share)
        c = self.atm_c(x)
        # branch order (w, h, c): fusion output 3c + k weighs branch k of channel c
        return self.proj_drop(self.proj(reweighted_sum(self.fusion, [w, h, c])))

    def extra_repr(self) -> str:
        return f"dim: {self.dim}"


class Downsample(nn.Module):
    """3x3 stride-2 conv applied to an NHWC tensor: ``[B,H,W,C] -> [B,H/2,W/2,C']``."""

    def __init__(self, in_chans, out_chans):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_chans, kernel_size=(3, 3), stride=(2, 2), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PEG(nn.Module):
    """Positional encoding generator: depthwise 3x3 conv (+ residual at stride 1), NHWC."""

    def __init__(self, in_chans, embed_dim=768, stride=1):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=3, stride=stride, padding=1, bias=True,
                              groups=embed_dim)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_conv = x.permute(0, 3, 1, 2)
        y = self.proj(x_conv)
        if self.stride == 1:
            y = y + x_conv
        return y.permute(0, 2, 3, 1)


class ActiveBlock(nn.Module):
    """``x + ATMLayer(norm1(x), offset)``, ``x + Mlp(norm2(x))``, then ``downsample``.

    With ``new_offset`` the block owns ``offset_layer = LayerNorm -> Linear(dim, 2*dim//share_dim)``.
    ``forward(x [B,H,W,C], offset [B,2C,H,W] or None)``: a block with an ``offset_layer`` makes
    an offset from its input when none is given and returns ``(x, offset)``; a block without one
    needs ``offset`` and returns ``x``.
    """

    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 share_dim=1, downsample=None, new_offset=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.atm = ATMLayer(dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.downsample = downsample
        self.new_offset = new_offset
        self.share_dim = share_dim
        if new_offset:
            self.offset_layer = nn.Sequential(norm_layer(dim), nn.Linear(dim, dim * 2 // share_dim))
        else:
            self.offset_layer = None

    def forward(self, x: torch.Tensor, offset: Optional[torch.Tensor] = None):
        if offset is None:
            if self.offset_layer is None:
                raise ValueError(
                    "offset is required: this ActiveBlock has no offset_layer (new_offset=False)"
                )
            o = self.offset_layer(x)  # compact [B,H,W,2C/S]: W half first, then H
            offset = o.repeat_interleave(self.share_dim, dim=-1).permute(0, 3, 1, 2)
            if x.shape[-1] % self.share_dim == 0:
                g = o.shape[-1] // 2
                y = self.atm.forward_compact(self.norm1(x), o[..., :g], o[..., g:], share=self.share_dim)
            else:  # an offset group straddles the W/H halves: only the expanded form is exact
                y = self.atm(self.norm1(x), offset)
        else:
            y = self.atm(self.norm1(x), offset)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.downsample is not None:
            x = self.downsample(x)
        if self.offset_layer is not None:
            return x, offset
        return x

    def extra_repr(self) -> str:
        return f"new_offset: {self.new_offset}, share_dim: {self.share_dim}"
