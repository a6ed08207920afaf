"""Triton backend of the fused ATMLayer path (``docs/atm.md`` section 6): the
internal ops ``mixops::_atm_means`` and ``mixops::_atm_mix``.

ATMLayer's reweighting needs the token mean of ``w + h + c`` before the weighted sum, but the
mean is linear, so two passes over x suffice and no branch output ever reaches HBM:

1. ``_atm_means``: per (b, c) token means of sw = gather_W(x), sh = gather_H(x) and of x
   (``[B, 3, C]``, fp32; fp64 for fp64). The branch means, the fusion MLP and the softmax are
   tiny torch ops on ``[B, C]`` (``mixops.ops.atm_layer``).
2. ``_atm_mix``: y = (sw·Ww^T + bw)·a0 + (sh·Wh^T + bh)·a1 + (x·Wc^T)·a2, i.e. one GEMM with
   K = 3C over ``[sw | sh | x]``: the A operand is gathered and lerped in the load stage
   (``lerp_gather``, shared with ``mixops.kernels.atm``); the branches' K-ranges run one after
   the other, and each branch's bias and per-(sample, output channel) softmax weight are
   applied as it finishes, in the official add order ``w*a0 + h*a1 + c*a2``. ``proj`` stays a
   separate ``nn.Linear``: folding it would make the per-sample weight a ``C x 3C`` product
   computed per image (B·3C³ FLOPs, more than the layer at B·HW < C) for no HBM saving, since
   y is written once either way.

Cost, N = B·H·W·C, e = element size, C_out = C for ATMLayer:
- means forward: ~20 FLOP per element (two lerps, three sums); minimal HBM traffic
  (1 + 2/S)·N·e (read x and both compact offsets; the lerp corners come from L1/L2);
  partials B·SPLIT·3·C·4 bytes.
- mix forward: 6·N·C_out FLOP (three branch GEMMs) + the lerps; minimal HBM traffic
  (1 + 2/S)·N·e + 3·C·C_out·e + B·H·W·C_out·e (read x, offsets, weights; write y).
- backward (torch GEMMs + the owner-computes atm_sample backward kernel, deterministic):
  dS_k = (a_k·dY) @ W_k for the three branches (6·N·C_out FLOP), the two gather backwards;
  dW_k and dalpha_k from one per-sample GEMM P_b = dY_b^T S_b (2·N·C_out FLOP per branch) when
  C <= H·W (P is no larger than an activation), else from dW_k = (a_k·dY)^T S_k plus the
  recomputed branch output (4·N·C_out FLOP per branch); S_w, S_h recomputed by the gather
  kernel (transients).

Grids:
- means: (B, SPLIT, cdiv(C, BLOCK_C)) -- program (b, s, c-block) sums the pixel blocks
  s, s + SPLIT, ... of image b in a fixed order and writes one fp32 partial; _common.column_sum
  over the SPLIT axis finishes the mean deterministically (no atomics). SPLIT is
  deterministic_split's: the shapes alone decide it.
- mix: (cdiv(M, BLOCK_M) · cdiv(C_out, BLOCK_N),) over the M = B·H·W pixels (tiles may span
  images: alpha is read per row); the column blocks of one row block are adjacent, so the
  gathers are re-read from L2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Blocks,
    accumulate_dtype,
    column_sum,
    compute_dtype,
    deterministic_split,
    dot_dtypes,
    interpreter_gemm_blocks,
    interpreting,
    needs_idx64,
    output_tile,
    pow2_between,
    strides,
)
from .atm import channel_tile, gather_gemm, launch_backward, lerp_gather
from .atm import forward as sample_forward

__all__ = [
    "MeansBlocks",
    "launch_means",
    "launch_mix",
    "means_backward",
    "means_blocks",
    "means_forward",
    "mix_backward",
    "mix_blocks",
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


@triton.jit
def _branch_gemm(
    x_ptr, off_ptr, w_ptr, b, i, j, m_ok, n, n_ok, H, W, C,
    sx_b, sx_h, sx_w, sx_c,
    so_b, so_h, so_w, so_g,
    sw_n, sw_k,
    SHARE: tl.constexpr,
    BRANCH: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] = S·W^T in COMPUTE for pixels (b, i, j) and output channels n of one
    ATMLayer branch: BRANCH 0 gathers S along W (the pixel's row), 1 along H (its column), with
    offsets off_ptr (strides so_*); 2 takes x itself (off_ptr unused). W [C_OUT, C] at
    n·sw_n + c·sw_k."""
    if BRANCH == 1:  # lines along H: the pixel's column
        x_line = b * sx_b + j * sx_w
        q = i
        N = H
        sx_p = sx_h
    else:  # lines along W: the pixel's row
        x_line = b * sx_b + i * sx_h
        q = j
        N = W
        sx_p = sx_w
    return gather_gemm(tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE), x_ptr, x_line, off_ptr,
                       b * so_b + i * so_h + j * so_w, q, N, sx_p, sx_c, so_g, m_ok, w_ptr, n, n_ok, sw_n, sw_k, C,
                       SHARE, BRANCH != 2, COMPUTE, DOT_DTYPE, PRECISION, IDX64, BLOCK_M, BLOCK_K)


@triton.jit
def _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, k_offset, COMPUTE: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of one branch's softmax weights al[b, n, k] in COMPUTE (element
    offset k_offset = k·sa_k), formed where it is used so no pointer tile stays live across
    the branch loops."""
    al = al_ptr + ((b * sa_b + k_offset)[:, None] + n[None, :] * sa_n)
    return tl.load(al, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(COMPUTE)


@triton.jit
def _atm_mix_kernel(
    x_ptr, ow_ptr, oh_ptr, ww_ptr, wh_ptr, wc_ptr, bw_ptr, bh_ptr, al_ptr, out_ptr,
    M, H, W, C, C_OUT,
    sx_b, sx_h, sx_w, sx_c,
    sow_b, sow_h, sow_w, sow_g,
    soh_b, soh_h, soh_w, soh_g,
    sww_n, sww_k, swh_n, swh_k, swc_n, swc_k,
    s_bw, s_bh,
    sa_b, sa_n, sa_k,
    sy_b, sy_h, sy_w, sy_c,
    SHARE: tl.constexpr,
    HAS_BW: tl.constexpr,
    HAS_BH: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b,i,j,n] = (sw·Ww[n] + bw[n])·al[b,n,0] + (sh·Wh[n] + bh[n])·al[b,n,1]
    + (x·Wc[n])·al[b,n,2], with sw / sh the W / H gathers of pixel (b,i,j), formed in the
    A-load stage (never stored).

    x_ptr   [B, H, W, C]: sx_b, sx_h, sx_w, sx_c.
    ow_ptr  [B, H, W, C/SHARE] W-branch offsets: sow_*; oh_ptr the H-branch offsets: soh_*.
    ww_ptr, wh_ptr, wc_ptr [C_OUT, C] branch weights: W[n, c] at n·s*_n + c·s*_k.
    bw_ptr, bh_ptr [C_OUT] biases, strides s_bw, s_bh (never read unless HAS_BW / HAS_BH).
    al_ptr  [B, C_OUT, 3] softmax weights: sa_b, sa_n, sa_k (k = w, h, c).
    out_ptr [B, H, W, C_OUT]: sy_b, sy_h, sy_w, sy_c.
    M = B·H·W GEMM rows (pixels, row-major), C the reduction of each branch, C_OUT the columns.
    COMPUTE: positions, lerp weights, accumulators; DOT_DTYPE / PRECISION as in _atm_fc_fwd_kernel.
    IDX64: pixel and element offsets in int64 (some tensor reaches 2^30 elements), else int32.
    Program pid: output_tile's row block x column block (a row block's column blocks adjacent).
    The branches run one after the other, each folded into the weighted sum as it finishes (in
    the official add order), so one gather and two [BLOCK_M, BLOCK_N] tiles are live at a
    time rather than two gathers and three accumulators: the registers that buy mix_blocks'
    wide column tiles, hence few gathers per row tile.
    """
    tl.static_assert(BLOCK_K >= 16)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    _, _, m, n, m_ok, n_ok = output_tile(M, C_OUT, BLOCK_M, BLOCK_N, IDX64)
    HW = H * W
    b = m // HW
    r = m % HW
    i = r // W
    j = r % W
    acc = _branch_gemm(x_ptr, ow_ptr, ww_ptr, b, i, j, m_ok, n, n_ok, H, W, C, sx_b, sx_h, sx_w, sx_c,
                       sow_b, sow_h, sow_w, sow_g, sww_n, sww_k, SHARE, 0, COMPUTE, DOT_DTYPE, PRECISION, IDX64,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BW:
        acc += tl.load(bw_ptr + n * s_bw, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
    y = acc * _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, 0, COMPUTE)
    acc = _branch_gemm(x_ptr, oh_ptr, wh_ptr, b, i, j, m_ok, n, n_ok, H, W, C, sx_b, sx_h, sx_w, sx_c,
                       soh_b, soh_h, soh_w, soh_g, swh_n, swh_k, SHARE, 1, COMPUTE, DOT_DTYPE, PRECISION, IDX64,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BH:
        acc += tl.load(bh_ptr + n * s_bh, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
    y = y + acc * _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, sa_k, COMPUTE)
    acc = _branch_gemm(x_ptr, ow_ptr, wc_ptr, b, i, j, m_ok, n, n_ok, H, W, C, sx_b, sx_h, sx_w, sx_c,
                       sow_b, sow_h, sow_w, sow_g, swc_n, swc_k, SHARE, 2, COMPUTE, DOT_DTYPE, PRECISION, IDX64,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    y = y + acc * _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, 2 * sa_k, COMPUTE)  # the official add order
    y_ptrs = out_ptr + ((b * sy_b + i * sy_h + j * sy_w)[:, None] + n[None, :] * sy_c)
    tl.store(y_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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


def mix_blocks(pixels: int, channels: int, c_out: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the mix GEMM: m pixels x n output channels, k input channels per step of each
    of the three branches. Each column block gathers both branches' A tiles again, so n is as
    wide as the registers allow without spills (ptxas for sm_90a at ActiveMLP's stage shapes,
    checked by tests/test_atm_layer.py): fp16/bf16 64 x 128 x 32 with 16 warps (119-124
    registers; 64 x 64: 95-97), i.e. one to four column blocks for C_out = 64..512; fp32 64 x 64
    x 16 with 16 warps (94 registers; n = 128 spills), dividing C_out when it can (C = 320:
    64); fp64 (gradcheck only) 64 x 32 x 16 with 8 warps. Under the interpreter: the tiles
    every GEMM takes there (interpreter_gemm_blocks)."""
    if interpreting():
        return interpreter_gemm_blocks(pixels, c_out, channels)
    if dtype == torch.float64:
        return Blocks(m=64, n=max(16, channel_tile(c_out, 32)), k=16, num_warps=8, num_stages=1)
    if dtype == torch.float32:
        return Blocks(m=64, n=max(16, channel_tile(c_out, 64)), k=16, num_warps=16, num_stages=1)
    return Blocks(m=64, n=pow2_between(c_out, 16, 128), k=32, num_warps=16, num_stages=2)


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


def launch_mix(
    x: torch.Tensor,
    offset_w: torch.Tensor,
    offset_h: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias_w: Optional[torch.Tensor],
    bias_h: Optional[torch.Tensor],
    alpha: torch.Tensor,
    out: torch.Tensor,
    share: int,
) -> None:
    """Write the reweighted branch sum into ``out [B,H,W,C_out]`` (any strides, must not overlap
    itself). ``weights`` = (W_w, W_h, W_c), each ``[C_out, C]``; ``alpha [B, C_out, 3]``."""
    B, H, W, C = x.shape
    M = B * H * W
    c_out = out.shape[-1]
    if M == 0 or c_out == 0:
        return
    blocks = mix_blocks(M, C, c_out, x.dtype)
    dot_dtype, _, precision = dot_dtypes(x.dtype)
    ww, wh, wc = weights
    grid = (triton.cdiv(M, blocks.m) * triton.cdiv(c_out, blocks.n),)
    _atm_mix_kernel[grid](
        x, offset_w, offset_h, ww, wh, wc,
        bias_w if bias_w is not None else ww, bias_h if bias_h is not None else wh, alpha, out,
        M, H, W, C, c_out,
        *strides(x), *strides(offset_w), *strides(offset_h),
        *strides(ww), *strides(wh), *strides(wc),
        strides(bias_w)[0] if bias_w is not None else 0, strides(bias_h)[0] if bias_h is not None else 0,
        *strides(alpha),
        *strides(out),
        SHARE=share,
        HAS_BW=bias_w is not None,
        HAS_BH=bias_h is not None,
        COMPUTE=compute_dtype(x.dtype),
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        IDX64=needs_idx64(x, offset_w, offset_h, ww, wh, wc, bias_w, bias_h, alpha, out),
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )


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
    launch_mix(x, offset_w, offset_h, (weight_w, weight_h, weight_c), bias_w, bias_h, alpha, out, share)
    return out


def alpha_grad_by_identity(channels: int, pixels: int) -> bool:
    """Whether dW_k and dalpha_k come from one per-sample GEMM P_b = dY_b^T S_b ([B, C_out, C],
    2·N·C_out FLOP per branch) instead of dW_k = (a_k·dY)^T S_k plus the recomputed branch
    output (4·N·C_out FLOP): when P (B·C·C_out) is no larger than an activation (B·H·W·C_out)."""
    return channels <= pixels


def mix_backward(grads: list, needs: list, x, offset_w, offset_h, weight_w, weight_h, weight_c,
                 bias_w, bias_h, alpha, share: int) -> list:
    """``mixops::_atm_mix`` backward, deterministic (torch GEMMs, _common.column_sum for every
    sum and the atomic-free atm_sample backward kernel): the gradients of the flagged inputs
    among (x, offset_w, offset_h, weight_w, weight_h, weight_c, bias_w, bias_h, alpha).

    Branch k (w, h, c) with features S_k (the gathers, recomputed; x for c), weight W_k, bias
    b_k and weights a_k: dS_k = (a_k·dY) @ W_k (then the gather backward for x and offsets),
    dW_k = sum_b diag(a_k[b]) dY_b^T S_b, db_k = sum over tokens of a_k·dY,
    dalpha[b, n, k] = sum_t dY[t, n]·(S_k[t]·W_k[n] + b_k[n]).
    """
    need_x, need_ow, need_oh, need_ww, need_wh, need_wc, need_bw, need_bh, need_alpha = needs
    B, H, W, C = x.shape
    acc = accumulate_dtype(x.dtype)
    g = grads[0]
    c_out = g.shape[-1]
    al = alpha.to(acc)
    g_acc = g.to(acc)
    gsum = column_sum(g.reshape(B, H * W, c_out))  # [B, C_out]
    identity = alpha_grad_by_identity(C, H * W)
    branches = (
        ("w", offset_w, weight_w, bias_w, need_ow, need_ww, need_bw),
        ("h", offset_h, weight_h, bias_h, need_oh, need_wh, need_bh),
        ("c", None, weight_c, None, False, need_wc, False),
    )
    gx = None
    got = {}
    dalpha = []
    for k, (axis, off, weight, bias, need_off, need_w, need_b) in enumerate(branches):
        a_k = al[:, None, None, :, k]
        ga = (g_acc * a_k).to(x.dtype)  # a_k·dY in the storage dtype, for the GEMMs
        if need_x or need_off:
            ds = torch.matmul(ga, weight)
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
        if need_w or need_alpha:
            s = x if axis == "c" else sample_forward(x, off, axis, share)
            s2 = s.reshape(B, H * W, C)
            if identity:
                p = torch.bmm(g.reshape(B, H * W, c_out).transpose(1, 2), s2).to(acc)  # [B, C_out, C]
                if need_w:
                    dw = column_sum((p * al[:, :, k, None]).reshape(1, B, c_out * C))
                    got[f"w_{axis}"] = dw.view(c_out, C).to(weight.dtype)
                if need_alpha:
                    d = column_sum((p * weight.to(acc)).transpose(1, 2))
            else:
                if need_w:
                    got[f"w_{axis}"] = (ga.reshape(-1, c_out).t() @ s2.reshape(-1, C)).to(weight.dtype)
                if need_alpha:
                    d = column_sum(g_acc.reshape(B, H * W, c_out) * torch.matmul(s2, weight.t()).to(acc))
            if need_alpha:
                if bias is not None:
                    d = d + gsum * bias.to(acc)
                dalpha.append(d)
        if need_b:
            got[f"b_{axis}"] = column_sum((gsum * al[:, :, k])[None])[0].to(bias.dtype)
    order = [("x", need_x), ("off_w", need_ow), ("off_h", need_oh), ("w_w", need_ww), ("w_h", need_wh),
             ("w_c", need_wc), ("b_w", need_bw), ("b_h", need_bh)]
    if need_x:
        got["x"] = gx.to(x.dtype)
    result = [got[name] for name, need in order if need]
    if need_alpha:
        result.append(torch.stack(dalpha, dim=2).to(alpha.dtype))
    return result
