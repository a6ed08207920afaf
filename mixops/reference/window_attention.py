"""UniFormer MHRA (global and windowed self-attention), restated literally in PyTorch.

Restates ``Sense-X/UniFormer`` @ 52a0415e4e0d (``docs/window_attention.md`` section 2):

- ``object_detection/mmdet/models/backbones/uniformer.py`` (OD): ``Attention`` (L84-109),
  ``SABlock`` (L112-135), ``window_partition`` / ``window_reverse`` (L138-165),
  ``SABlock_Windows`` (L168-215) and the stage-3 block choice (L310-336);
- ``video_classification/slowfast/models/uniformer.py`` (VID): the 3-D ``SABlock``
  (L139-162), global attention over all T*H*W tokens.

Two levels:

- ``window_attention(qkv, num_heads, window_size, scale, padding, qkv_bias)`` is the op-level
  computation and the ``torch`` backend of ``mixops.window_attention``: it starts from a qkv
  tensor computed on the *unpadded* map and pads it with the qkv bias rows, which is exactly
  what the official zero-padding of the LayerNorm output before the qkv Linear produces
  (a zero row times W_qkv plus b_qkv is b_qkv). Then partition, attention per window,
  reverse, crop -- the official sequence.
- ``attention_forward``, ``sablock_forward``, ``sablock_windows_forward`` and
  ``video_sablock_forward`` compute the official module forwards from a module's parameters
  (the oracle for ``mixops.nn`` and the ``official`` benchmark baseline). Dropout and
  drop-path are the identity here (p = 0 in every official config, and in eval); the MLP
  activation is the exact GELU (the official default ``act_layer``); the LayerNorm eps is the
  module's own (1e-6 when built as the official backbones build it).

Shapes: ``qkv`` is ``[B, H, W, 3C]`` or ``[B, T, H, W, 3C]`` with the last axis laid out as
``[q|k|v] x head x d``; the op output is ``[B, H, W, C]`` (``[B, T, H, W, C]``), heads
concatenated in order, before ``proj``. No validation here: the public op validates.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import layer_norm, mlp_forward

__all__ = [
    "window_attention",
    "window_attention_sdpa",
    "window_partition",
    "window_reverse",
    "attention_forward",
    "sablock_forward",
    "sablock_windows_forward",
    "video_sablock_forward",
    "stage3_block_types",
]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``[B, Hp, Wp, C]`` -> ``[B*nH*nW, ws, ws, C]``; window ``b*nH*nW + i*nW + j``, row-major.

    ``Hp`` and ``Wp`` must be multiples of ``window_size`` (the caller pads).
    """
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """The inverse of ``window_partition``: ``[B*nH*nW, ws, ws, C]`` -> ``[B, H, W, C]``."""
    # the official recovers B with float arithmetic; exact for any realistic size
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


def _attention(
    qkv: torch.Tensor, num_heads: int, scale: float, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The official ``Attention.forward`` between ``qkv`` and ``proj``: ``[B', N, 3C] -> [B', N, C]``.

    ``key_mask`` (``[B', N]`` bool, True = ignore this key) is the masked variant; the
    official code has no mask.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * scale
    if key_mask is not None:
        attn = attn.masked_fill(key_mask[:, None, None, :], float("-inf"))
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)


def _attention_sdpa(
    qkv: torch.Tensor, num_heads: int, scale: float, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``_attention`` through ``F.scaled_dot_product_attention`` (PyTorch's fused kernels)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    mask = None if key_mask is None else ~key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, N, C)


def _pad_bottom_right(x: torch.Tensor, pad_b: int, pad_r: int, fill: torch.Tensor) -> torch.Tensor:
    """Append ``pad_r`` columns and then ``pad_b`` rows whose every token is ``fill`` ([3C])."""
    B, H, W, C = x.shape
    if pad_r:
        x = torch.cat([x, fill.expand(B, H, pad_r, C)], dim=2)
    if pad_b:
        x = torch.cat([x, fill.expand(B, pad_b, W + pad_r, C)], dim=1)
    return x


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: Optional[int],
    scale: float,
    padding: str,
    qkv_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Attention inside ws x ws windows anchored at (0, 0), or global when ``window_size`` is None.

    qkv: ``[B, H, W, 3C]`` (or ``[B, T, H, W, 3C]``, global only). Returns ``[B, H, W, C]``.

    ``padding="bias"`` (UniFormer): edge windows are completed bottom/right with tokens whose
    q, k, v are the slices of ``qkv_bias`` (zeros when None) and nothing is masked.
    ``padding="mask"``: the padded keys are excluded from the softmax instead.
    """
    return _window_attention(qkv, num_heads, window_size, scale, padding, qkv_bias, _attention)


def window_attention_sdpa(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: Optional[int],
    scale: float,
    padding: str,
    qkv_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``window_attention`` with each window's attention through
    ``F.scaled_dot_product_attention``: pad + partition + SDPA + reverse, the strongest plain
    PyTorch form of the official computation (the benchmarks' baseline, DESIGN.md)."""
    return _window_attention(qkv, num_heads, window_size, scale, padding, qkv_bias, _attention_sdpa)


def _window_attention(qkv, num_heads, window_size, scale, padding, qkv_bias, attend):
    if window_size is None:
        # global: row-major tokens (t*H*W + y*W + x), like the official flatten(2).transpose(1, 2)
        *lead, C3 = qkv.shape
        B, n = lead[0], math.prod(lead[1:])
        out = attend(qkv.reshape(B, n, C3), num_heads, scale)
        return out.reshape(*lead, C3 // 3)

    B, H, W, C3 = qkv.shape
    C = C3 // 3
    ws = window_size
    pad_r = (ws - W % ws) % ws
    pad_b = (ws - H % ws) % ws
    if padding == "bias":
        fill = qkv_bias if qkv_bias is not None else qkv.new_zeros(C3)
    else:
        fill = qkv.new_zeros(C3)
    # contiguous: window_partition views, as the official does on its (contiguous) padded map
    x = _pad_bottom_right(qkv, pad_b, pad_r, fill).contiguous()
    _, Hp, Wp, _ = x.shape

    x_windows = window_partition(x, ws).view(-1, ws * ws, C3)
    key_mask = None
    if padding == "mask":
        real = torch.ones(B, H, W, 1, dtype=torch.bool, device=x.device)
        real = _pad_bottom_right(real, pad_b, pad_r, real.new_zeros(1))
        key_mask = ~window_partition(real, ws).view(-1, ws * ws)
    attn_windows = attend(x_windows, num_heads, scale, key_mask)

    attn_windows = attn_windows.view(-1, ws, ws, C)
    out = window_reverse(attn_windows, ws, Hp, Wp)
    if pad_r > 0 or pad_b > 0:
        out = out[:, :H, :W, :].contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# module-level forwards (the official modules, from a module's parameters)


def attention_forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official ``Attention.forward`` on ``x: [B', N, C]`` -> ``[B', N, C]`` (qkv, attention, proj)."""
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias)
    out = _attention(qkv, m.num_heads, m.scale)
    return F.linear(out, m.proj.weight, m.proj.bias)


def sablock_forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official 2-D global ``SABlock.forward``: ``x: [B, C, H, W]`` -> ``[B, C, H, W]``."""
    x = x + F.conv2d(x, m.pos_embed.weight, m.pos_embed.bias, padding=1, groups=x.shape[1])
    B, N, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = x + attention_forward(m.attn, layer_norm(m.norm1, x))
    x = x + mlp_forward(m.mlp, layer_norm(m.norm2, x))
    return x.transpose(1, 2).reshape(B, N, H, W)


def sablock_windows_forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official ``SABlock_Windows.forward`` (docs/window_attention.md section 2.4): ``x: [B, C, H, W]`` -> ``[B, C, H, W]``.

    The LayerNorm output is zero-padded bottom/right to multiples of ``m.window_size`` *before*
    the qkv Linear, so padded tokens carry the qkv bias; nothing is masked.
    """
    x = x + F.conv2d(x, m.pos_embed.weight, m.pos_embed.bias, padding=1, groups=x.shape[1])
    x = x.permute(0, 2, 3, 1)
    B, H, W, C = x.shape
    shortcut = x
    x = layer_norm(m.norm1, x)

    ws = m.window_size
    pad_r = (ws - W % ws) % ws
    pad_b = (ws - H % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, Hp, Wp, _ = x.shape

    x_windows = window_partition(x, ws).view(-1, ws * ws, C)
    attn_windows = attention_forward(m.attn, x_windows)
    attn_windows = attn_windows.view(-1, ws, ws, C)
    x = window_reverse(attn_windows, ws, Hp, Wp)
    if pad_r > 0 or pad_b > 0:
        x = x[:, :H, :W, :].contiguous()

    x = shortcut + x
    x = x + mlp_forward(m.mlp, layer_norm(m.norm2, x))
    return x.permute(0, 3, 1, 2).reshape(B, C, H, W)


def video_sablock_forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Official video ``SABlock.forward``: ``x: [B, C, T, H, W]`` -> same shape.

    3x3x3 depthwise DPE, then global attention over all T*H*W tokens (index t*H*W + y*W + x).
    """
    x = x + F.conv3d(x, m.pos_embed.weight, m.pos_embed.bias, padding=1, groups=x.shape[1])
    B, C, T, H, W = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = x + attention_forward(m.attn, layer_norm(m.norm1, x))
    x = x + mlp_forward(m.mlp, layer_norm(m.norm2, x))
    return x.transpose(1, 2).reshape(B, C, T, H, W)


def stage3_block_types(depth: int, windows: bool, hybrid: bool) -> list[str]:
    """``"window"`` / ``"global"`` for each of the ``depth`` stage-3 blocks (docs/window_attention.md section 2.2).

    ``windows`` is tested first and overrides ``hybrid``; with ``hybrid`` block i is global
    when ``(i + 1) % 4 == 0``; with neither, every block is global.
    """
    if windows:
        return ["window"] * depth
    if hybrid:
        return ["global" if (i + 1) % 4 == 0 else "window" for i in range(depth)]
    return ["global"] * depth
