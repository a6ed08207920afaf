"""Triton backend of the fused ATMLayer path (``docs/atm.md`` section 6): the
internal ops ``mixops::_atm_means`` and ``mixops::_atm_mix``.

ATMLayer's reweighting needs the token mean of ``w + h + c`` before the weighted sum, but the
mean is linear, so two passes over x suffice and no branch output ever reaches HBM:

1. ``_atm_means``: per (b, c) token means of sw = gather_W(x), sh = gather_H(x) and of x
   (``[B, 3, C]``, fp32; fp64 for fp64). The branch means, the fusion MLP and the softmax are
   tiny torch ops on ``[B, C]`` (``mixops.ops.atm_layer``).
2. ``_atm_mix``: y = (sw·Ww^T + bw)·a0 + (sh·Wh^T + bh)·a1 + (x·Wc^T)·a2, i.e. one GEMM with
   K = 3C over ``[sw | sh | x]``: the reweighted branch GEMM of ``kernels/_reweighted_mix.py``
   (shared with the DynaMixerBlock path), its A operand gathered and lerped in the load stage
   (``lerp_gather``, shared with ``mixops.kernels.atm``), in the official add order
   ``w*a0 + h*a1 + c*a2``; ``proj`` stays a separate ``nn.Linear``.

Cost, N = B·H·W·C, e = element size, C_out = C for ATMLayer:
- means forward: ~20 FLOP per element (two lerps, three sums); minimal HBM traffic
  (1 + 2/S)·N·e (read x and both compact offsets; the lerp corners come from L1/L2);
  partials B·SPLIT·3·C·4 bytes.
- mix: kernels/_reweighted_mix.py (cost, backward strategy and grid there); the backward adds
  the owner-computes atm_sample backward kernel for the two gathers, whose features it
  recomputes (transients).

Grids:
- means: (B, SPLIT, cdiv(C, BLOCK_C)) -- program (b, s, c-block) sums the pixel blocks
  s, s + SPLIT, ... of image b in a fixed order and writes one fp32 partial; _common.column_sum
  over the SPLIT axis finishes the mean deterministically (no atomics). SPLIT is
  deterministic_split's: the shapes alone decide it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import accumulate_dtype, column_sum, compute_dtype, deterministic_split, interpreting, strides
from ._reweighted_mix import branch_backward, launch_mix, token_sums
from .atm import channel_tile, launch_backward, lerp_gather
from .atm import forward as sample_forward

__all__ = [
    "MeansBlocks",
    "launch_means",
    "means_backward",
    "means_blocks",
    "means_forward",
    "mix_backward",
    "mix_forward",
]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gather_pixels(
    x_ptr, off_ptr, b, i, j, c0, C, m_ok, H, W,
    sx_b, sx_h, sx_w, sx_c,
    so_b, so_h, so_w, so_g,
    SHARE: tl.constexpr,
    ALONG_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The lerped features of pixels (b, i, j) ([BLOCK_M], int64 when IDX64, else int32; valid
    where m_ok) and the channels c0 + [0, BLOCK_C) (c0 a multiple of BLOCK_C, < C) of a
    [B,H,W,C] tensor (strides sx_*), sampled along H (the pixel's column) when ALONG_H, else
    along W (its row), with compact offsets [B,H,W,C/SHARE] (strides so_*)."""
    o_row = b * so_b + i * so_h + j * so_w
    if ALONG_H:
        out = lerp_gather(x_ptr, b * sx_b + j * sx_w, off_ptr, o_row, i, c0, C, H, sx_h, sx_c, so_g, m_ok, SHARE,
                          True, COMPUTE, IDX64, BLOCK_M, BLOCK_C)
    else:
        out = lerp_gather(x_ptr, b * sx_b + i * sx_h, off_ptr, o_row, j, c0, C, W, sx_w, sx_c, so_g, m_ok, SHARE,
                          True, COMPUTE, IDX64, BLOCK_M, BLOCK_C)
    return out


@triton.jit
def _atm_means_kernel(
    x_ptr, ow_ptr, oh_ptr, part_ptr,
    H, W, C, SPLIT,
    sx_b, sx_h, sx_w, sx_c,
    sow_b, sow_h, sow_w, sow_g,
    soh_b, soh_h, soh_w, soh_g,
    SHARE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """part[b, s, k, c] = sum over the pixel blocks s, s + SPLIT, ... of image b of
    sw (k = 0), sh (k = 1) and x (k = 2).

    x_ptr    [B, H, W, C] input: sx_b, sx_h, sx_w, sx_c.
    ow_ptr   [B, H, W, C/SHARE] W-branch compact offsets: sow_b, sow_h, sow_w, sow_g.
    oh_ptr   [B, H, W, C/SHARE] H-branch compact offsets: soh_b, soh_h, soh_w, soh_g.
    part_ptr [B, SPLIT, 3, C] contiguous partial sums in COMPUTE.
    Program (b, s, channel block); BLOCK_M pixels (row-major i·W + j) x BLOCK_C channels per
    step, accumulated elementwise and reduced over the pixels once at the end.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    c0 = tl.program_id(2) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)
    HW = H * W
    acc_w = tl.zeros([BLOCK_M, BLOCK_C], dtype=COMPUTE)
    acc_h = tl.zeros([BLOCK_M, BLOCK_C], dtype=COMPUTE)
    acc_x = tl.zeros([BLOCK_M, BLOCK_C], dtype=COMPUTE)
    for m0 in range(s * BLOCK_M, HW, SPLIT * BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M)
        r_ok = r < HW
        mask = r_ok[:, None] & c_ok[None, :]
        i = (r // W).to(tl.int64)
        j = (r % W).to(tl.int64)
        acc_w += _gather_pixels(x_ptr, ow_ptr, b, i, j, c0, C, r_ok, H, W, sx_b, sx_h, sx_w, sx_c,
                                sow_b, sow_h, sow_w, sow_g, SHARE, False, COMPUTE, True, BLOCK_M, BLOCK_C)
        acc_h += _gather_pixels(x_ptr, oh_ptr, b, i, j, c0, C, r_ok, H, W, sx_b, sx_h, sx_w, sx_c,
                                soh_b, soh_h, soh_w, soh_g, SHARE, True, COMPUTE, True, BLOCK_M, BLOCK_C)
        x_ptrs = x_ptr + (b * sx_b + i * sx_h + j * sx_w)[:, None] + c64[None, :] * sx_c
        acc_x += tl.load(x_ptrs, mask=mask, other=0.0).to(COMPUTE)
    part = part_ptr + ((b * SPLIT + s) * 3) * C + c64
    tl.store(part, tl.sum(acc_w, axis=0), mask=c_ok)
    tl.store(part + C, tl.sum(acc_h, axis=0), mask=c_ok)
    tl.store(part + 2 * C, tl.sum(acc_x, axis=0), mask=c_ok)


# ---------------------------------------------------------------------------------------------
# Block-size heuristics
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeansBlocks:
    """Tile and pixel split of the means kernel: m pixels x c channels per step, split
    programs per image and channel block."""

    m: int
    c: int
    split: int
    num_warps: int


def means_blocks(batch: int, pixels: int, channels: int) -> MeansBlocks:
    """Tiles and pixel split of the means kernel for ``pixels = H·W`` per image.

    On a GPU: 64 channel lanes (a 128-byte bf16 row segment) x 16 pixels, three fp32
    accumulators of 1024 values (8 per thread at 4 warps); the pixels of an image cut by
    deterministic_split over the B·cdiv(C, BLOCK_C) tiles (a function of the shapes alone,
    at most 256 ranges: column_sum adds them). Under the interpreter (~1 ms per program and
    per step): one program per image and channel block, tiles of up to 16K elements."""
    if interpreting():
        block_c = min(triton.next_power_of_2(channels), 64)
        block_m = max(1, min(triton.next_power_of_2(pixels), 16384 // block_c))
        return MeansBlocks(m=block_m, c=block_c, split=1, num_warps=4)
    block_c = channel_tile(channels, 64)
    block_m = max(1, min(triton.next_power_of_2(pixels), 1024 // block_c))
    c_blocks = triton.cdiv(channels, block_c)
    split = deterministic_split(pixels, block_m, batch * c_blocks)
    return MeansBlocks(m=block_m, c=block_c, split=split, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def launch_means(x: torch.Tensor, offset_w: torch.Tensor, offset_h: torch.Tensor, share: int) -> torch.Tensor:
    """The partial sums ``[B, SPLIT, 3, C]`` (fp32; fp64 for fp64 x) of the means kernel."""
    B, H, W, C = x.shape
    blocks = means_blocks(B, H * W, C)
    part = torch.zeros((B, blocks.split, 3, C), dtype=accumulate_dtype(x.dtype), device=x.device)
    if B * H * W * C == 0:
        return part
    grid = (B, blocks.split, triton.cdiv(C, blocks.c))
    _atm_means_kernel[grid](
        x, offset_w, offset_h, part,
        H, W, C, blocks.split,
        *strides(x), *strides(offset_w), *strides(offset_h),
        SHARE=share,
        COMPUTE=compute_dtype(x.dtype),
        BLOCK_M=blocks.m,
        BLOCK_C=blocks.c,
        num_warps=blocks.num_warps,
    )
    return part


# ---------------------------------------------------------------------------------------------
# Registry entry points (mixops.backend)
# ---------------------------------------------------------------------------------------------


def means_forward(x, offset_w, offset_h, share: int) -> torch.Tensor:
    """``mixops::_atm_means`` forward: ``[B, 3, C]`` token means of (sw, sh, x)."""
    part = launch_means(x, offset_w, offset_h, share)
    B, split, _, C = part.shape
    return column_sum(part.view(B, split, 3 * C)).view(B, 3, C) / (x.shape[1] * x.shape[2])


def means_backward(grads: list, needs: list, x, offset_w, offset_h, share: int) -> list:
    """``mixops::_atm_means`` backward. The gradient of a token mean is g/(H·W) at every token,
    so each gather's backward is the owner-computes atm_sample kernel on an expanded
    (zero-stride) constant gradient; x also gets g[:, 2]/(H·W) directly."""
    need_x, need_ow, need_oh = needs
    B, H, W, C = x.shape
    acc = accumulate_dtype(x.dtype)
    g = grads[0].to(acc) / (H * W)
    gx = g[:, 2, None, None, :].expand(B, H, W, C) if need_x else None
    goffs = []
    for k, (axis, off, need_off) in enumerate((("w", offset_w, need_ow), ("h", offset_h, need_oh))):
        gxk = torch.empty(x.shape, dtype=acc, device=x.device) if need_x else None
        gok = torch.empty(off.shape, dtype=off.dtype, device=off.device) if need_off else None
        launch_backward(g[:, k, None, None, :].expand(B, H, W, C), x, off, gxk, gok, axis, share)
        if need_x:
            gx = gx + gxk
        if need_off:
            goffs.append(gok)
    return ([gx.to(x.dtype)] if need_x else []) + goffs


def mix_forward(x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w, bias_h, alpha, share: int):
    """``mixops::_atm_mix`` forward: ``[B,H,W,C] -> [B,H,W,C_out]``."""
    out = torch.empty((*x.shape[:-1], weight_w.shape[0]), dtype=x.dtype, device=x.device)
    launch_mix((x, x, x), (offset_w, offset_h), (weight_w, weight_h, weight_c), (bias_w, bias_h, None), alpha, out,
               share)  # fmt: skip
    return out


def mix_backward(grads: list, needs: list, x, offset_w, offset_h, weight_w, weight_h, weight_c,
                 bias_w, bias_h, alpha, share: int) -> list:
    """``mixops::_atm_mix`` backward, deterministic: the gradients of the flagged inputs among
    (x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w, bias_h, alpha). Branch k
    (w, h, c) by _reweighted_mix.branch_backward with features the gathers (recomputed) and x;
    dS_w / dS_h through the atomic-free atm_sample backward kernel into x and the offsets."""
    need_x, need_ow, need_oh, need_ww, need_wh, need_wc, need_bw, need_bh, need_alpha = needs
    acc = accumulate_dtype(x.dtype)
    g = grads[0]
    gsum = token_sums(g) if need_bw or need_bh or need_alpha else None
    branches = (
        ("w", offset_w, weight_w, bias_w, need_ow, need_ww, need_bw),
        ("h", offset_h, weight_h, bias_h, need_oh, need_wh, need_bh),
        ("c", None, weight_c, None, False, need_wc, False),
    )
    gx = None
    got = {}
    dalpha = []
    for k, (axis, off, weight, bias, need_off, need_w, need_b) in enumerate(branches):
        features = (lambda: x) if axis == "c" else (lambda off=off, axis=axis: sample_forward(x, off, axis, share))
        ds, dw, db, da = branch_backward(g, gsum, alpha, k, features, weight, bias, need_x or need_off, need_w,
                                         need_b, need_alpha)  # fmt: skip
        if ds is not None:
            if axis == "c":
                gx = ds.to(acc) if gx is None else gx + ds
            else:
                gxk = torch.empty(x.shape, dtype=acc, device=x.device) if need_x else None
                gok = torch.empty(off.shape, dtype=off.dtype, device=off.device) if need_off else None
                launch_backward(ds, x, off, gxk, gok, axis, share)
                if need_x:
                    gx = gxk if gx is None else gx + gxk
                if need_off:
                    got[f"off_{axis}"] = gok
        got[f"w_{axis}"], got[f"b_{axis}"] = dw, db
        dalpha.append(da)
    order = [("x", need_x), ("off_w", need_ow), ("off_h", need_oh), ("w_w", need_ww), ("w_h", need_wh),
             ("w_c", need_wc), ("b_w", need_bw), ("b_h", need_bh)]
    if need_x:
        got["x"] = gx.to(x.dtype)
    result = [got[name] for name, need in order if need]
    if need_alpha:
        result.append(torch.stack(dalpha, dim=2).to(alpha.dtype))
    return result
