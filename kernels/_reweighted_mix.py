# The reweighted sum of three channel-FC branches: pass 2 of the ViP-style layers whose softmax
# weights the token-mean identity makes known before any branch output exists (ATMLayer,
# docs/atm.md section 6; DynaMixerBlock, docs/dynamixer.md section 11). With branch features
# S_k [B, H, W, C], weights W_k [C_out, C], optional biases b_k and alpha [B, C_out, 3]:
#   out[t, n] = (S_0[t]·W_0[n] + b_0[n])·a[b, n, 0] + (S_1[t]·W_1[n] + b_1[n])·a[b, n, 1]
#             + (S_2[t]·W_2[n] + b_2[n])·a[b, n, 2]                   (the official add order)
# i.e. one GEMM with K = 3C over [S_0 | S_1 | S_2]. The branches' K-ranges run one after the
# other, each folded into the weighted sum with its bias and softmax weight as it finishes, so
# no branch output ever reaches HBM. The S_k are
#   ATMLayer:       S_0 / S_1 the lerp gathers of x along W / H (GATHER; formed in the A-load
#                   stage by kernels/atm.py's gather_gemm, never stored), S_2 = x;
#   DynaMixerBlock: the H- and W-mixed maps and x, read where they lie.
# proj stays a separate nn.Linear: folding it would make the per-sample weight a C x 3C product
# computed per image (B·3C³ FLOPs, more than the layer at B·HW < C) for no HBM saving, since the
# output is written once either way.
#
# Cost, N = B·H·W·C, e = element size: 6·N·C_out FLOP; minimal HBM traffic 3·N·e (1·N·e when
# the gathers read x) + 3·C·C_out·e + B·H·W·C_out·e (read the features, weights; write out).
# Backward (branch_backward, torch GEMMs, deterministic): dS_k = (a_k·dY) @ W_k (6·N·C_out FLOP);
# dW_k and dalpha_k from one per-sample GEMM P_b = dY_b^T S_b ([B, C_out, C], 2·N·C_out FLOP per
# branch) when C <= H·W (P is no larger than an activation), else from dW_k = (a_k·dY)^T S_k
# plus the recomputed branch output (4·N·C_out FLOP per branch).
#
# Grid: (cdiv(M, BLOCK_M) · cdiv(C_out, BLOCK_N),) over the M = B·H·W pixels (tiles may span
# images: alpha is read per row); the column blocks of one row block are adjacent, so the
# features (or gathers) are re-read from L2.
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Blocks,
    accumulate_dtype,
    column_sum,
    dot_dtypes,
    compute_dtype,
    interpreter_gemm_blocks,
    interpreting,
    needs_idx64,
    output_tile,
    pow2_between,
    strides,
)
from .atm import channel_tile, gather_gemm

__all__ = ["alpha_grad_by_identity", "branch_backward", "launch_mix", "mix_blocks", "token_sums"]


@triton.jit
def _branch_gemm(
    f_ptr, off_ptr, w_ptr, b, i, j, m_ok, n, n_ok, H, W, C,
    sf_b, sf_h, sf_w, sf_c,
    so_b, so_h, so_w, so_g,
    sw_n, sw_k,
    SHARE: tl.constexpr,
    GATHER: tl.constexpr,
    ALONG_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] = S·W^T in COMPUTE for pixels (b, i, j) and output channels n of one
    branch: with GATHER, S is the lerp gather of f along H (the pixel's column) when ALONG_H,
    else along W (its row), with offsets off_ptr (strides so_*); without, f itself at the
    pixel (off_ptr unused). W [C_OUT, C] at n·sw_n + c·sw_k."""
    if ALONG_H:  # lines along H: the pixel's column
        f_line = b * sf_b + j * sf_w
        q = i
        N = H
        sf_p = sf_h
    else:  # lines along W: the pixel's row
        f_line = b * sf_b + i * sf_h
        q = j
        N = W
        sf_p = sf_w
    return gather_gemm(tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE), f_ptr, f_line, off_ptr,
                       b * so_b + i * so_h + j * so_w, q, N, sf_p, sf_c, so_g, m_ok, w_ptr, n, n_ok, sw_n, sw_k, C,
                       SHARE, GATHER, COMPUTE, DOT_DTYPE, PRECISION, IDX64, BLOCK_M, BLOCK_K)


@triton.jit
def _branch_bias(acc, b_ptr, n, n_ok, s_b, HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + n * s_b, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
    return acc


@triton.jit
def _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, k_offset, COMPUTE: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of one branch's softmax weights al[b, n, k] in COMPUTE (element
    offset k_offset = k·sa_k), formed where it is used so no pointer tile stays live across
    the branch loops."""
    al = al_ptr + ((b * sa_b + k_offset)[:, None] + n[None, :] * sa_n)
    return tl.load(al, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(COMPUTE)


@triton.jit
def _reweighted_mix_kernel(
    f0_ptr, f1_ptr, f2_ptr, o0_ptr, o1_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, al_ptr, out_ptr,
    M, H, W, C, C_OUT,
    sf0_b, sf0_h, sf0_w, sf0_c,
    sf1_b, sf1_h, sf1_w, sf1_c,
    sf2_b, sf2_h, sf2_w, sf2_c,
    so0_b, so0_h, so0_w, so0_g,
    so1_b, so1_h, so1_w, so1_g,
    sw0_n, sw0_k, sw1_n, sw1_k, sw2_n, sw2_k,
    s_b0, s_b1, s_b2,
    sa_b, sa_n, sa_k,
    sy_b, sy_h, sy_w, sy_c,
    SHARE: tl.constexpr,
    GATHER: tl.constexpr,
    HAS_B0: tl.constexpr,
    HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b,i,j,n] = sum over k of (S_k·W_k[n] + b_k[n])·al[b,n,k], in the order k = 0, 1, 2.

    f0_ptr, f1_ptr, f2_ptr [B, H, W, C] branch features: sf*_b, sf*_h, sf*_w, sf*_c. With
        GATHER, S_0 / S_1 are the lerp gathers along W / H of f0 / f1 (ATMLayer: both x) with
        compact offsets o0_ptr / o1_ptr [B, H, W, C/SHARE] (so*_b, so*_h, so*_w, so*_g);
        without, S_k = f_k (offsets unused). S_2 = f2 always.
    w*_ptr [C_OUT, C] branch weights: W_k[n, c] at n·sw*_n + c·sw*_k.
    b*_ptr [C_OUT] biases, strides s_b* (never read unless HAS_B*).
    al_ptr [B, C_OUT, 3] softmax weights: sa_b, sa_n, sa_k.
    out_ptr [B, H, W, C_OUT]: sy_b, sy_h, sy_w, sy_c.
    M = B·H·W GEMM rows (pixels, row-major), C the reduction of each branch, C_OUT the columns.
    COMPUTE: lerp weights, accumulators; DOT_DTYPE / PRECISION: _common.dot_dtypes.
    IDX64: pixel and element offsets in int64 (some tensor reaches 2^30 elements), else int32.
    Program pid: output_tile's row block x column block (a row block's column blocks adjacent).
    The branches run one after the other, each folded into the weighted sum as it finishes, so
    one A tile and two [BLOCK_M, BLOCK_N] tiles are live at a time rather than three
    accumulators: the registers that buy mix_blocks' wide column tiles, hence few A re-reads.
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
    acc = _branch_gemm(f0_ptr, o0_ptr, w0_ptr, b, i, j, m_ok, n, n_ok, H, W, C, sf0_b, sf0_h, sf0_w, sf0_c,
                       so0_b, so0_h, so0_w, so0_g, sw0_n, sw0_k, SHARE, GATHER, False, COMPUTE, DOT_DTYPE, PRECISION,
                       IDX64, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _branch_bias(acc, b0_ptr, n, n_ok, s_b0, HAS_B0, COMPUTE)
    y = acc * _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, 0, COMPUTE)
    acc = _branch_gemm(f1_ptr, o1_ptr, w1_ptr, b, i, j, m_ok, n, n_ok, H, W, C, sf1_b, sf1_h, sf1_w, sf1_c,
                       so1_b, so1_h, so1_w, so1_g, sw1_n, sw1_k, SHARE, GATHER, True, COMPUTE, DOT_DTYPE, PRECISION,
                       IDX64, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _branch_bias(acc, b1_ptr, n, n_ok, s_b1, HAS_B1, COMPUTE)
    y = y + acc * _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, sa_k, COMPUTE)
    acc = _branch_gemm(f2_ptr, o0_ptr, w2_ptr, b, i, j, m_ok, n, n_ok, H, W, C, sf2_b, sf2_h, sf2_w, sf2_c,
                       so0_b, so0_h, so0_w, so0_g, sw2_n, sw2_k, SHARE, False, False, COMPUTE, DOT_DTYPE, PRECISION,
                       IDX64, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = _branch_bias(acc, b2_ptr, n, n_ok, s_b2, HAS_B2, COMPUTE)
    y = y + acc * _alpha(al_ptr, b, n, m_ok, n_ok, sa_b, sa_n, 2 * sa_k, COMPUTE)  # the official add order
    y_ptrs = out_ptr + ((b * sy_b + i * sy_h + j * sy_w)[:, None] + n[None, :] * sy_c)
    tl.store(y_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def mix_blocks(pixels: int, channels: int, c_out: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the mix GEMM: m pixels x n output channels, k input channels per step of each
    of the three branches. Each column block loads (or gathers) both A tiles again, so n is as
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


def launch_mix(
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    offsets: Optional[tuple[torch.Tensor, torch.Tensor]],
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    biases: tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]],
    alpha: torch.Tensor,
    out: torch.Tensor,
    share: int = 1,
) -> None:
    """Write the reweighted branch sum into ``out [B,H,W,C_out]`` (any strides, must not overlap
    itself). ``features`` = (f_0, f_1, f_2), each ``[B,H,W,C]`` (any strides); ``offsets`` =
    the compact (W, H) offsets ``[B,H,W,C/share]`` when S_0 / S_1 are the ATM gathers of f_0 /
    f_1, else None; ``weights`` each ``[C_out, C]``; ``biases`` each ``[C_out]`` or None;
    ``alpha [B, C_out, 3]``."""
    f0 = features[0]
    B, H, W, C = f0.shape
    M = B * H * W
    c_out = out.shape[-1]
    if M == 0 or c_out == 0:
        return
    blocks = mix_blocks(M, C, c_out, f0.dtype)
    dot_dtype, _, precision = dot_dtypes(f0.dtype)
    o0, o1 = offsets if offsets is not None else (f0, f0)
    grid = (triton.cdiv(M, blocks.m) * triton.cdiv(c_out, blocks.n),)
    _reweighted_mix_kernel[grid](
        *features, o0, o1, *weights, *(bias if bias is not None else out for bias in biases), alpha, out,
        M, H, W, C, c_out,
        *(s for f in features for s in strides(f)), *strides(o0), *strides(o1),
        *(s for w in weights for s in strides(w)),
        *(strides(bias)[0] if bias is not None else 0 for bias in biases),
        *strides(alpha),
        *strides(out),
        SHARE=share,
        GATHER=offsets is not None,
        HAS_B0=biases[0] is not None,
        HAS_B1=biases[1] is not None,
        HAS_B2=biases[2] is not None,
        COMPUTE=compute_dtype(f0.dtype),
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        IDX64=needs_idx64(*features, o0, o1, *weights, *biases, alpha, out),
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )  # fmt: skip


def alpha_grad_by_identity(channels: int, pixels: int) -> bool:
    """Whether dW_k and dalpha_k come from one per-sample GEMM P_b = dY_b^T S_b ([B, C_out, C],
    2·N·C_out FLOP per branch) instead of dW_k = (a_k·dY)^T S_k plus the recomputed branch
    output (4·N·C_out FLOP): when P (B·C·C_out) is no larger than an activation (B·H·W·C_out)."""
    return channels <= pixels


def token_sums(g: torch.Tensor) -> torch.Tensor:
    """[B, C_out] sums over the tokens of each sample of g [B,H,W,C_out] (accumulate dtype,
    fixed order): what db_k and the bias share of dalpha_k need."""
    B, H, W, c_out = g.shape
    return column_sum(g.reshape(B, H * W, c_out))


def branch_backward(
    g: torch.Tensor,
    gsum: Optional[torch.Tensor],
    alpha: torch.Tensor,
    k: int,
    features: Callable[[], torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    need_s: bool,
    need_w: bool,
    need_b: bool,
    need_alpha: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dS_k, dW_k, db_k, dalpha[:, :, k]) of branch k, each None unless asked for: torch GEMMs
    and _common.column_sum for every sum (deterministic, no atomics).

    g [B,H,W,C_out] the output gradient; gsum its token_sums (needed for db_k, and for dalpha_k
    with a bias); alpha [B, C_out, 3]; ``features()`` gives S_k
    [B,H,W,C] (called only when dW_k or dalpha_k is asked for: a family may recompute it);
    weight [C_out, C]; bias [C_out] or None. dS_k = (a_k·dY) @ W_k in g's dtype,
    dW_k = sum_b diag(a_k[b]) dY_b^T S_b, db_k = sum over tokens of a_k·dY,
    dalpha[b, n, k] = sum_t dY[t, n]·(S_k[t]·W_k[n] + b_k[n]) in the accumulate dtype."""
    B, H, W, c_out = g.shape
    acc = accumulate_dtype(g.dtype)
    al = alpha.to(acc)[:, :, k]
    # g times an accumulate-dtype tensor computes in that dtype: no converted copy of g per branch
    ga = (g * al[:, None, None, :]).to(g.dtype)  # a_k·dY in the storage dtype, for the GEMMs
    ds = torch.matmul(ga, weight) if need_s else None
    dw = db = dalpha = None
    if need_w or need_alpha:
        s = features()
        C = s.shape[-1]
        s2 = s.reshape(B, H * W, C)
        if alpha_grad_by_identity(C, H * W):
            p = torch.bmm(g.reshape(B, H * W, c_out).transpose(1, 2), s2).to(acc)  # [B, C_out, C]
            if need_w:
                dw = column_sum((p * al[:, :, None]).reshape(1, B, c_out * C)).view(c_out, C).to(weight.dtype)
            if need_alpha:
                dalpha = column_sum((p * weight.to(acc)).transpose(1, 2))
        else:
            if need_w:
                dw = (ga.reshape(-1, c_out).t() @ s2.reshape(-1, C)).to(weight.dtype)
            if need_alpha:
                dalpha = column_sum(g.reshape(B, H * W, c_out) * torch.matmul(s2, weight.t()).to(acc))
    if need_b:
        db = column_sum((gsum * al)[None])[0].to(bias.dtype)
    if need_alpha and bias is not None:
        dalpha = dalpha + gsum * bias.to(acc)
    return ds, dw, db, dalpha
