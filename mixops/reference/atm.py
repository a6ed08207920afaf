"""ActiveMLP's Active Token Mixer (ATM), restated in plain PyTorch.

Restates ``microsoft/ActiveMLP@fb44035e219b:models/activemlp.py``: ``Mlp`` (L23-39), ``ATMOp``
(L42-96), ``ATMLayer`` (L99-132), ``ActiveBlock`` (L141-189), ``Downsample`` (L192-204), ``PEG``
(L207-229) and ``ActiveMLP.forward_blocks`` (L331-343). Semantics: ``docs/atm.md``.

Shapes: ``x [B,H,W,C]`` channels-last; a *compact* offset is ``[B,H,W,C/share]`` where channel
``c`` uses offset ``c // share`` (``repeat_interleave``); offsets are in pixels, unbounded.

Op level (the ``torch`` backend of ``mixops.atm_sample`` / ``mixops.atm_fc``, same positional
signature as the op schemas, no validation):

- ``atm_fc(x, offset, weight, bias, axis, share)`` -> ``[B,H,W,C_out]``: the official ATMOp,
  i.e. ``torchvision.ops.deform_conv2d`` with a zero ``[B,2C,H,W]`` offset tensor whose even
  (dy, axis 'h') or odd (dx, axis 'w') slots hold the offset and a 1x1 kernel, when torchvision
  is importable (``atm_fc_deform``; fp16/bf16 run in fp32 and are cast back, as under AMP);
  otherwise the 1-D lerp followed by the same FC (``atm_fc_lerp``). torchvision is imported
  lazily: it is not a dependency.
- ``atm_sample(x, offset, axis, share)`` -> ``[B,H,W,C]``: the gather alone. It always uses the
  1-D lerp (``atm_sample_lerp``): there is no official gather-only call, the lerp is bit-exact to
  deform_conv2d with an identity 1x1 weight (docs/atm.md section 1, tested), and it avoids a C x C identity GEMM.

Module level (the ``official`` baseline and the oracle of the module tests; read parameters from
a module, call only the functions here and torch): ``atm_op_forward``, ``atm_layer_forward``,
``mlp_forward``, ``make_offset``, ``peg_forward``, ``downsample_forward``,
``active_block_forward``, ``forward_blocks``; and ``offset_schedule`` (docs/atm.md section 7).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import layer_norm, branch_weights, mlp_forward

__all__ = [
    "active_block_forward",
    "atm_fc",
    "atm_fc_deform",
    "atm_fc_lerp",
    "atm_layer_forward",
    "atm_means",
    "atm_mix",
    "atm_op_forward",
    "atm_sample",
    "atm_sample_lerp",
    "deform_conv2d_available",
    "downsample_forward",
    "forward_blocks",
    "make_offset",
    "mlp_forward",
    "offset_schedule",
    "peg_forward",
]

_AXIS_DIM = {"h": 1, "w": 2}  # the dimension of [B,H,W,C] that each axis samples along


# ---------------------------------------------------------------------------------------------
# 1-D lerp formulation (docs/atm.md section 3 "lerp0" and 4)
# ---------------------------------------------------------------------------------------------


def atm_sample_lerp(x: torch.Tensor, offset: torch.Tensor, axis: str, share: int) -> torch.Tensor:
    """Per-channel 1-D zero-padded linear interpolation along ``axis``.

    ``x [B,H,W,C]``, ``offset [B,H,W,C/share]`` -> ``[B,H,W,C]`` in ``x.dtype``. For axis 'w',
    ``out[b,i,j,c] = lerp0(x[b,i,:,c], j + offset[b,i,j,c // share])``; 'h' samples the column.
    Positions and weights are computed in fp32 (fp64 for fp64 inputs), whatever the storage
    dtype: fp16 alone resolves only ~1/32 px at p ~ 32-64 (docs/atm.md section 4.1).

    ``floor`` makes autograd give the floor-based offset gradient ``V(k+1) - V(k)``: the
    right-hand slope at integers, ``x[0]`` at p = -1, zero for p < -1 and p >= n (docs/atm.md section 4.2).
    """
    dim = _AXIS_DIM[axis]
    n = x.shape[dim]
    compute = torch.promote_types(torch.promote_types(x.dtype, offset.dtype), torch.float32)
    xc = x.to(compute)
    delta = offset.to(compute).repeat_interleave(share, dim=-1)
    where = [1, 1, 1, 1]
    where[dim] = n
    p = torch.arange(n, device=x.device, dtype=compute).view(where) + delta
    k = torch.floor(p)
    f = p - k
    # Clamping to [-2, n] keeps the int64 cast defined for huge offsets; both corners of any
    # k outside that range are already out of bounds, and so they stay.
    k0 = k.clamp(-2, n).long()
    k1 = k0 + 1
    v0 = _corner(xc, dim, k0, n)
    v1 = _corner(xc, dim, k1, n)
    return ((1 - f) * v0 + f * v1).to(x.dtype)


def _corner(x: torch.Tensor, dim: int, k: torch.Tensor, n: int) -> torch.Tensor:
    """``V(k) = x[k]`` along ``dim`` when ``0 <= k < n``, else 0 (zero padding)."""
    inside = (k >= 0) & (k < n)
    # where(), not a multiply by the mask: a clamped-in neighbour that is inf must not give NaN
    return torch.where(inside, torch.gather(x, dim, k.clamp(0, n - 1)), 0.0)


def atm_fc_lerp(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    axis: str,
    share: int,
) -> torch.Tensor:
    """``atm_sample_lerp`` followed by the 1x1 FC: ``[B,H,W,C] -> [B,H,W,C_out]``.

    ``weight [C_out, C]``, ``bias [C_out]`` or None.
    """
    return F.linear(atm_sample_lerp(x, offset, axis, share), weight, bias)


# ---------------------------------------------------------------------------------------------
# The official drive of torchvision.ops.deform_conv2d (docs/atm.md section 5)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _deform_conv2d() -> Optional[Callable]:
    """``torchvision.ops.deform_conv2d``, or None when torchvision is not installed."""
    try:
        from torchvision.ops import deform_conv2d
    except ImportError:
        return None
    return deform_conv2d


def deform_conv2d_available() -> bool:
    """Whether the official deform_conv2d path can run (torchvision is importable)."""
    return _deform_conv2d() is not None


def _official_atm_op(input, offset, weight, bias, dimension, stride, padding, dilation):
    """The official ATMOp call. fp16/bf16 tensors run in fp32 and come back in their dtype,
    as torchvision's autocast rule runs deform_conv2d (it has no bf16 kernels and no Half
    kernels on CPU); this is what the official code computes under AMP."""
    if input.dtype in (torch.float32, torch.float64):
        return _OfficialATMOp.apply(input, offset, weight, bias, dimension, stride, padding, dilation)
    up = [t.float() if t is not None else None for t in (input, offset, weight, bias)]
    return _OfficialATMOp.apply(*up, dimension, stride, padding, dilation).to(input.dtype)


def _official_offset_t(input: torch.Tensor, offset: torch.Tensor, dimension: str) -> torch.Tensor:
    """The official ``offset_t``: zeros ``[B,2C,H,W]`` with the offset in the dy (even, 'h') or
    dx (odd, 'w') slots of each channel's (dy, dx) pair."""
    B, C, H, W = input.size()
    offset_t = torch.zeros(B, 2 * C, H, W, dtype=input.dtype, layout=input.layout, device=input.device)
    if dimension == "w":
        offset_t[:, 1::2, :, :] += offset
    elif dimension == "h":
        offset_t[:, 0::2, :, :] += offset
    else:
        raise NotImplementedError(f"{dimension} dimension not implemented")
    return offset_t


class _OfficialATMOp(torch.autograd.Function):
    """The official ``ATMOp.forward`` body; its backward is torchvision's own backward kernel.

    Why a Function: torchvision registers deform_conv2d's autograd in a way that ``torch.func``
    transforms reject, and the ``torch`` backend's backward is ``torch.func.vjp`` of this
    reference. The backward returns exactly what autograd through the official code returns:
    torchvision's gradients, with the offset gradient read from the slots the offset was added
    into (the other slot's gradient is computed and discarded, as in the official code).
    """

    @staticmethod
    def forward(input, offset, weight, bias, dimension, stride, padding, dilation):
        offset_t = _official_offset_t(input, offset, dimension)
        return _deform_conv2d()(
            input, offset_t, weight, bias, stride=stride, padding=padding, dilation=dilation
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, offset, weight, bias, dimension, stride, padding, dilation = inputs
        ctx.save_for_backward(input, offset, weight, bias)
        ctx.conf = (dimension, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        input, offset, weight, bias = ctx.saved_tensors
        dimension, stride, padding, dilation = ctx.conf
        offset_t = _official_offset_t(input, offset, dimension)
        # the placeholders torchvision.ops.deform_conv2d passes for "no mask" and "no bias"
        mask = torch.zeros((input.shape[0], 1), device=input.device, dtype=input.dtype)
        b = bias if bias is not None else input.new_zeros(weight.shape[0])
        g_input, g_weight, g_offset_t, _, g_bias = torch.ops.torchvision._deform_conv2d_backward(
            grad, input, weight, offset_t, mask, b,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            input.shape[1] // weight.shape[1], offset_t.shape[1] // 2, False,
        )
        g_offset = g_offset_t[:, 1::2] if dimension == "w" else g_offset_t[:, 0::2]
        return (
            g_input, g_offset, g_weight, g_bias if bias is not None else None, None, None, None, None
        )


def atm_fc_deform(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    axis: str,
    share: int,
) -> torch.Tensor:
    """``atm_fc`` through deform_conv2d exactly as the official ATMLayer/ATMOp drive it.

    Needs torchvision. ``x [B,H,W,C]``, ``offset [B,H,W,C/share]``, ``weight [C_out,C]`` ->
    ``[B,H,W,C_out]``.
    """
    # offset_layer output -> repeat_interleave(S) -> permute to [B,C,H,W], as in ActiveBlock
    off = offset.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)
    out = _official_atm_op(
        x.permute(0, 3, 1, 2), off, weight[:, :, None, None], bias, axis, (1, 1), (0, 0), (1, 1)
    )
    return out.permute(0, 2, 3, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Op level: the torch backend
# ---------------------------------------------------------------------------------------------


def atm_sample(x: torch.Tensor, offset: torch.Tensor, axis: str, share: int) -> torch.Tensor:
    """The gather alone, ``[B,H,W,C] -> [B,H,W,C]`` (always the 1-D lerp; see the module doc)."""
    return atm_sample_lerp(x, offset, axis, share)


def atm_fc(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    axis: str,
    share: int,
) -> torch.Tensor:
    """Gather + FC, ``[B,H,W,C] -> [B,H,W,C_out]``: the official deform_conv2d call when
    torchvision is installed (fp16/bf16 computed in fp32, as under AMP), else the 1-D lerp + FC."""
    if deform_conv2d_available():
        return atm_fc_deform(x, offset, weight, bias, axis, share)
    return atm_fc_lerp(x, offset, weight, bias, axis, share)


# ---------------------------------------------------------------------------------------------
# Internal ops of the fused ATMLayer (docs/atm.md section 6): the torch backend of mixops::_atm_means / _atm_mix
# ---------------------------------------------------------------------------------------------


def atm_means(x: torch.Tensor, offset_w: torch.Tensor, offset_h: torch.Tensor, share: int) -> torch.Tensor:
    """Token means of the W-sampled features, the H-sampled features and x itself:
    ``x [B,H,W,C]``, compact offsets ``[B,H,W,C/share]`` -> ``[B, 3, C]`` (k = w, h, x) in fp32
    (fp64 for fp64 inputs). The branch means of ATMLayer follow by linearity (docs/atm.md section 6)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    sw = atm_sample_lerp(xa, offset_w.to(acc), "w", share)
    sh = atm_sample_lerp(xa, offset_h.to(acc), "h", share)
    return torch.stack([t.mean(dim=(1, 2)) for t in (sw, sh, xa)], dim=1)


def atm_mix(
    x: torch.Tensor,
    offset_w: torch.Tensor,
    offset_h: torch.Tensor,
    weight_w: torch.Tensor,
    weight_h: torch.Tensor,
    weight_c: torch.Tensor,
    bias_w: Optional[torch.Tensor],
    bias_h: Optional[torch.Tensor],
    alpha: torch.Tensor,
    share: int,
) -> torch.Tensor:
    """ATMLayer's reweighted branch sum before ``proj``: ``w*a0 + h*a1 + c*a2`` with
    ``w = atm_fc(x, offset_w, weight_w, bias_w, 'w')``, ``h`` likewise along H,
    ``c = x @ weight_c.T`` and ``alpha [B, C_out, 3]`` (branch order w, h, c), in the official
    add order. ``weight_* [C_out, C]``; returns ``[B,H,W,C_out]``."""
    w = atm_fc_lerp(x, offset_w, weight_w, bias_w, "w", share)
    h = atm_fc_lerp(x, offset_h, weight_h, bias_h, "h", share)
    c = F.linear(x, weight_c)
    a = alpha[:, None, None]
    return w * a[..., 0] + h * a[..., 1] + c * a[..., 2]


# ---------------------------------------------------------------------------------------------
# Module level: official forwards computed from a module's parameters
# ---------------------------------------------------------------------------------------------


def atm_op_forward(m, input: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Official ``ATMOp.forward``: ``input [B,C,H,W]``, ``offset [B,C,H,W]`` -> ``[B,C_out,H,W]``.

    Uses deform_conv2d with ``m``'s stride/padding/dilation when it can run; otherwise the 1-D
    lerp, which restates only the configuration ATMLayer uses (stride 1, padding 0; a 1x1
    kernel never reads a dilated tap, so dilation changes nothing).
    """
    if deform_conv2d_available():
        return _official_atm_op(
            input, offset, m.weight, m.bias, m.dimension, m.stride, m.padding, m.dilation
        )
    if m.dimension not in _AXIS_DIM:
        raise NotImplementedError(f"{m.dimension} dimension not implemented")
    if tuple(m.stride) != (1, 1) or tuple(m.padding) != (0, 0):
        raise ValueError(
            "ATMOp with stride != 1 or padding != 0 needs torchvision.ops.deform_conv2d; "
            f"got stride={tuple(m.stride)}, padding={tuple(m.padding)}"
        )
    out = atm_fc_lerp(
        input.permute(0, 2, 3, 1), offset.permute(0, 2, 3, 1), m.weight[:, :, 0, 0], m.bias,
        m.dimension, 1,
    )
    return out.permute(0, 3, 1, 2)


def atm_layer_forward(m, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Official ``ATMLayer.forward``: ``x [B,H,W,C]``, ``offset [B,2C,H,W]`` -> ``[B,H,W,C]``.

    ``offset[:, :C]`` drives the W branch, ``offset[:, C:]`` the H branch; fusion weights are
    the softmax over k of ``fc2`` output ``3c + k``, k = (w, h, c).
    """
    B, H, W, C = x.shape
    if tuple(offset.shape) != (B, 2 * C, H, W):
        raise ValueError(f"offset shape not match, got {tuple(offset.shape)}")
    w = atm_op_forward(m.atm_w, x.permute(0, 3, 1, 2), offset[:, :C, :, :]).permute(0, 2, 3, 1)
    h = atm_op_forward(m.atm_h, x.permute(0, 3, 1, 2), offset[:, C:, :, :]).permute(0, 2, 3, 1)
    c = F.linear(x, m.atm_c.weight, m.atm_c.bias)

    a = (w + h + c).permute(0, 3, 1, 2).flatten(2).mean(2)
    a = branch_weights(m.fusion, a, 3)
    a = a.unsqueeze(2).unsqueeze(2)

    x = w * a[0] + h * a[1] + c * a[2]
    x = F.linear(x, m.proj.weight, m.proj.bias)
    return F.dropout(x, m.proj_drop.p, m.training)


def make_offset(m_offset_layer, x: torch.Tensor, share: int) -> torch.Tensor:
    """Official offset generation: ``LayerNorm -> Linear(C, 2C/S) -> repeat_interleave(S)`` on
    the block input ``x [B,H,W,C]``, permuted to the non-contiguous ``[B,2C,H,W]`` view."""
    ln, fc = m_offset_layer[0], m_offset_layer[1]
    o = F.linear(layer_norm(ln, x), fc.weight, fc.bias)
    return o.repeat_interleave(share, dim=-1).permute(0, 3, 1, 2)


def peg_forward(m, x: torch.Tensor) -> torch.Tensor:
    """Official ``PEG.forward``: depthwise 3x3 conv (+ residual at stride 1), NHWC in and out."""
    x_conv = x.permute(0, 3, 1, 2)
    p = m.proj
    y = F.conv2d(x_conv, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
    if m.stride == 1:
        y = y + x_conv
    return y.permute(0, 2, 3, 1)


def downsample_forward(m, x: torch.Tensor) -> torch.Tensor:
    """Official ``Downsample.forward``: 3x3 stride-2 conv on an NHWC tensor."""
    p = m.proj
    y = F.conv2d(x.permute(0, 3, 1, 2), p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
    return y.permute(0, 2, 3, 1)


def active_block_forward(m, x: torch.Tensor, offset: Optional[torch.Tensor] = None):
    """Official ``ActiveBlock.forward``: ``x [B,H,W,C]``, ``offset [B,2C,H,W]`` or None.

    A block with an ``offset_layer`` called without an offset makes one from its input and
    returns ``(x, offset)``; a block without one returns ``x``. ``drop_path`` is the block's own
    (parameter-free) child.
    """
    if m.offset_layer is not None and offset is None:
        offset = make_offset(m.offset_layer, x, m.share_dim)
    x = x + m.drop_path(atm_layer_forward(m.atm, layer_norm(m.norm1, x), offset))
    x = x + m.drop_path(mlp_forward(m.mlp, layer_norm(m.norm2, x)))
    if m.downsample is not None:
        x = downsample_forward(m.downsample, x)
    if m.offset_layer is not None:
        return x, offset
    return x


def forward_blocks(blocks, pos_blocks, intv: int, x: torch.Tensor) -> torch.Tensor:
    """Official ``ActiveMLP.forward_blocks``: ``x [B,H,W,C]`` -> ``[B, H'W', C']``.

    ``blocks[i][j]`` are ActiveBlocks, ``pos_blocks[i]`` the stage's PEG. An offset-generating
    block (docs/atm.md section 7) first applies the stage's shared PEG and makes a new offset; every other
    block reuses the stage's latest offset.
    """
    for i in range(len(blocks)):
        for j, blk in enumerate(blocks[i]):
            if j % intv == 0 and j != len(blocks[i]) - 1:
                x = peg_forward(pos_blocks[i], x)
                x, offset = active_block_forward(blk, x)
            else:
                x = active_block_forward(blk, x, offset)
    B, H, W, C = x.shape
    return x.reshape(B, -1, C)


def offset_schedule(depths: Sequence[int], intv: int) -> list[list[int]]:
    """The offset-generating block indices of each stage: ``j % intv == 0 and j != depth - 1``."""
    return [[j for j in range(d) if j % intv == 0 and j != d - 1] for d in depths]
