# MorphFC reweighted projection (mixops::_reweighted_proj), Triton backend.
#
# What it computes. With K = 2 or 3 branches X_k [B, T, H, W, C] (tokens M = B*T*H*W), alpha
# [B, C, K] (fp32; fp64 for fp64) and proj W [C, C], b [C]:
#   A[m, c] = ((X_0*a_0 + X_1*a_1) + X_2*a_2)[m, c],  a_k = alpha[b(m), c, k]
#   out = A @ W^T + b
# A never reaches HBM: the forward is the channel-FC GEMM of kernels/morph_fc.py (the "w" token
# map with L = 1) whose operand load forms A (_load_mixed); dW = dOut^T @ A recomputes A in the
# load stage of the same split-M dW/db kernel as the branches use.
# The kernel of this file is the dA GEMM dA = dOut @ W, whose epilogue writes, instead of dA,
#   dX_k = a_k * dA                           (K outputs from one GEMM)
#   dalpha partials: per tile and batch item, sum over its rows of dA * X_k (batch_colsums),
# reduced by _common.column_sum (kernels.morph_fc.batch_sums): deterministic on every GPU, no
# atomics.
# alpha is read once per batch item a tile spans (kernels.morph_fc.alpha_tile).
#
# FLOPs (numel = M*C): forward 2*numel*C (+ 2K*numel for the weighted sum); backward 2*numel*C
# for dA, 2*numel*C for dW (+ about 4K*numel for the epilogue and the recomputed A).
# Minimal HBM bytes (e = element size): forward (K+1)*numel*e + C*C*e (read the branches, write
# out); backward dA: numel*e (dOut) + K*numel*e (read X_k for dalpha) + K*numel*e (write dX_k);
# dW/db: (K+1)*numel*e. Partials: 4*K*C*slots*cdiv(M, BLOCK_M) bytes for dalpha, SPLIT*C*(C+1)*4
# for dW/db. The unfused torch path moves about 3x the forward bytes (write and re-read A, and
# the K products).
#
# Grid: dA: (cdiv(M, BLOCK_M) * cdiv(C, BLOCK_N),) with the C tiles of one row block adjacent
# (dOut rows re-read from L2), tiles from kernels.morph_fc.gemm_blocks.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_dtypes, needs_idx64, output_tile, strides, vector_hint, weight_operand
from .morph_fc import (
    Geometry,
    alpha_items,
    alpha_tile,
    as_video,
    batch_colsums,
    batch_partials,
    batch_slots,
    batch_sums,
    gathered_vector_width,
    gemm_blocks,
    gemm_mainloop,
    geometry,
    launch_gemm,
    tile_offsets,
    weight_grads,
)


@triton.jit
def _branch_grad_epilogue(
    da, x_ptr, g_ptr, alpha_ptr, part_ptr, x_offs, g_offs, rows, cols, row_ok, col_ok, row0,
    M, ROWS_PER_B, pid_m, sp_0, sp_1,
    K: tl.constexpr, C: tl.constexpr, NBR: tl.constexpr, ALPHA_ITEMS: tl.constexpr, NEED_X: tl.constexpr,
    NEED_ALPHA: tl.constexpr, VEC_X: tl.constexpr, VEC_G: tl.constexpr, BLOCK_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Branch K of the dA epilogue: dX_K = a_K * dA at g_ptr, and the dalpha partial column
    sums of dA * X_K at columns K*C + c of the partial rows (batch_colsums)."""
    ok = row_ok[:, None] & col_ok[None, :]
    if NEED_X:
        a = alpha_tile(alpha_ptr, rows, cols, ok, row0, M, C, ROWS_PER_B, K, NBR, ALPHA_ITEMS).to(ACC_DTYPE)
        tl.store(vector_hint(g_ptr, g_offs, VEC_G, 1), (a * da).to(g_ptr.dtype.element_ty), mask=ok)
    if NEED_ALPHA:
        x = tl.load(vector_hint(x_ptr, x_offs, VEC_X, 1), mask=ok, other=0.0).to(ACC_DTYPE)
        batch_colsums(da * x, rows, cols, row_ok, col_ok, M, ROWS_PER_B, part_ptr + K * C, pid_m, sp_0, sp_1, BLOCK_M)


@triton.jit
def _proj_grad_kernel(
    dy_ptr, w_ptr, x0_ptr, x1_ptr, x2_ptr, alpha_ptr, g0_ptr, g1_ptr, g2_ptr, part_ptr,
    M, T, H, W, ROWS_PER_B,
    sy_b, sy_t, sy_h, sy_w, sy_c,
    sw_o, sw_i,
    sx_b, sx_t, sx_h, sx_w, sx_c,
    sg_b, sg_t, sg_h, sg_w, sg_c,
    sp_0, sp_1,
    C: tl.constexpr, NBR: tl.constexpr, ALPHA_ITEMS: tl.constexpr, NEED_X: tl.constexpr, NEED_ALPHA: tl.constexpr,
    IDX64: tl.constexpr, VEC_Y: tl.constexpr, VEC_W: tl.constexpr, DIM_W: tl.constexpr, VEC_X: tl.constexpr,
    VEC_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dA = dOut @ W on token rows, never stored: its epilogue writes dX_k = a_k * dA and the
    dalpha partials.

    dy_ptr:    [B, T, H, W, C] dOut (may be expanded), strides sy_b..sy_c
    w_ptr:     [C, C] proj weight W[o, i] at o*sw_o + i*sw_i (dA[m, i] = sum_o dOut[m, o] W[o, i])
    x0_ptr, x1_ptr, x2_ptr: [B, T, H, W, C] branches (x2 only if NBR == 3), one set of strides
               sx_b..sx_c (read only if NEED_ALPHA)
    alpha_ptr: [B, C, NBR] contiguous (read only if NEED_X, as ALPHA_ITEMS says: alpha_tile)
    g0_ptr, g1_ptr, g2_ptr: [B, T, H, W, C] branch gradients, strides sg_b..sg_c (if NEED_X)
    part_ptr:  [cdiv(M, BLOCK_M) * slots + 1, NBR*C] dalpha partials (if NEED_ALPHA): tile
               pid_m, slot j, branch k, channel c at pid_m*sp_0 + j*sp_1 + k*C + c
    M = B*T*H*W tokens, ROWS_PER_B = T*H*W; C a constexpr (the map's D, as for the channel FC).
    IDX64: int64 offsets (host-chosen); VEC_Y / VEC_X / VEC_G: vector hints of the gathered
    tensors (gathered_vector_width), VEC_W / DIM_W: that of W (weight_operand).
    """
    tl.static_assert(BLOCK_K >= 16)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid_m, _, rows, cols, row_ok, col_ok = output_tile(M, C, BLOCK_M, BLOCK_N, IDX64)
    # the channel FC: the "w" token map with L = 1 (one chunk per token), D = C
    NCH = H * W
    row0 = pid_m.to(rows.dtype) * BLOCK_M
    da = gemm_mainloop(
        dy_ptr, dy_ptr, dy_ptr, dy_ptr, dy_ptr, w_ptr, rows, cols, row_ok, col_ok, row0,
        M, C, T, H, W, 1, NCH, ROWS_PER_B, sy_b, sy_t, sy_h, sy_w, sy_c, sw_o, sw_i,
        C, 0, 1, 1, False, VEC_Y, VEC_W, DIM_W, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION,
    )  # fmt: skip
    x_offs = tile_offsets(rows, cols, T, H, W, 1, NCH, sx_b, sx_t, sx_h, sx_w, sx_c, C, 0, 0)
    g_offs = tile_offsets(rows, cols, T, H, W, 1, NCH, sg_b, sg_t, sg_h, sg_w, sg_c, C, 0, 0)
    _branch_grad_epilogue(
        da, x0_ptr, g0_ptr, alpha_ptr, part_ptr, x_offs, g_offs, rows, cols, row_ok, col_ok, row0,
        M, ROWS_PER_B, pid_m, sp_0, sp_1, 0, C, NBR, ALPHA_ITEMS, NEED_X, NEED_ALPHA, VEC_X, VEC_G, BLOCK_M, ACC_DTYPE,
    )  # fmt: skip
    _branch_grad_epilogue(
        da, x1_ptr, g1_ptr, alpha_ptr, part_ptr, x_offs, g_offs, rows, cols, row_ok, col_ok, row0,
        M, ROWS_PER_B, pid_m, sp_0, sp_1, 1, C, NBR, ALPHA_ITEMS, NEED_X, NEED_ALPHA, VEC_X, VEC_G, BLOCK_M, ACC_DTYPE,
    )  # fmt: skip
    if NBR == 3:
        _branch_grad_epilogue(
            da, x2_ptr, g2_ptr, alpha_ptr, part_ptr, x_offs, g_offs, rows, cols, row_ok, col_ok, row0,
            M, ROWS_PER_B, pid_m, sp_0, sp_1, 2, C, NBR, ALPHA_ITEMS, NEED_X, NEED_ALPHA, VEC_X, VEC_G, BLOCK_M,
            ACC_DTYPE,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def launch_proj_grad(
    dy5: torch.Tensor,
    weight: torch.Tensor,
    branches: list[torch.Tensor],
    alpha: torch.Tensor,
    geo: Geometry,
    grads: list[torch.Tensor] | None,
    part: torch.Tensor | None,
) -> None:
    """grads[k] <- alpha[..., k] * (dOut @ W) and/or part <- the dalpha partials
    (batch_partials(geo, gemm_blocks(...), K*C, ...)).

    dy5: [B, T, H, W, C] any strides; branches: K tensors of one layout; alpha [B, C, K]
    contiguous; grads: None or K tensors of one layout, of the branches' shape."""
    blocks = gemm_blocks(geo.M, geo.F, dy5.dtype)
    dot_dtype, acc_dtype, precision = dot_dtypes(dy5.dtype)
    sw_o, sw_i, vec_w, dim_w = weight_operand(weight, transpose_weight=False, extent=geo.F)
    x0, x1, x2 = (*branches, branches[0])[:3]
    g0, g1, g2 = (*grads, grads[0])[:3] if grads is not None else (x0, x0, x0)
    sp = (part.stride(0) * batch_slots(geo, blocks), part.stride(0)) if part is not None else (0, 0)
    grid = (triton.cdiv(geo.M, blocks.m) * triton.cdiv(geo.F, blocks.n),)
    _proj_grad_kernel[grid](
        dy5, weight, x0, x1, x2, alpha, g0, g1, g2, part if part is not None else alpha,
        geo.M, geo.T, geo.H, geo.W, geo.rows_per_b,
        *strides(dy5),
        sw_o, sw_i,
        *strides(x0),
        *strides(g0),
        *sp,
        C=geo.F, NBR=len(branches), ALPHA_ITEMS=alpha_items(geo.rows_per_b, blocks.m),
        NEED_X=grads is not None, NEED_ALPHA=part is not None,
        IDX64=needs_idx64(dy5, *branches, *(grads or ()), part),
        VEC_Y=gathered_vector_width(dy5, geo.D), VEC_W=vec_w, DIM_W=dim_w,
        VEC_X=min(gathered_vector_width(t, geo.D) for t in branches),
        VEC_G=min(gathered_vector_width(t, geo.D) for t in (grads or branches)),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Registry entry points (mixops.backend.register("_reweighted_proj", "triton", ...))
# ---------------------------------------------------------------------------------------------


def _prepare(b0, b1, b2, alpha):
    """(branches as [B, T, H, W, C] of one layout, alpha contiguous, the channel-FC map). The
    fused layer's branches are fresh contiguous tensors; other callers' differing layouts are
    copied once, since the kernels address every branch with one set of strides."""
    branches = [as_video(b) for b in (b0, b1, b2) if b is not None]
    if any(strides(b) != strides(branches[0]) for b in branches[1:]):
        branches = [b.contiguous() for b in branches]
    return branches, alpha.contiguous(), geometry(tuple(branches[0].shape), 1, "c")


def forward(b0, b1, b2, alpha, weight, bias):
    """The ``triton`` forward of ``mixops::_reweighted_proj``: one channel-FC GEMM whose
    operand load forms the reweighted branch sum."""
    branches, alpha, geo = _prepare(b0, b1, b2, alpha)
    out = torch.empty(branches[0].shape, dtype=b0.dtype, device=b0.device)
    launch_gemm(branches[0], weight, bias, out, geo, transpose_weight=True, more=tuple(branches[1:]), alpha=alpha)
    return out.reshape(b0.shape)


def backward(grads, needs, b0, b1, b2, alpha, weight, bias):
    """The ``triton`` backward: branch and alpha gradients from one dA GEMM's epilogue, dW / db
    from the split-M kernel with the weighted sum recomputed in its load stage."""
    need_x = needs[:3] if b2 is not None else needs[:2]
    need_alpha, need_w, need_b = needs[-3:]
    branches, alpha, geo = _prepare(b0, b1, b2, alpha)
    dy5 = as_video(grads[0])
    B, K = branches[0].shape[0], len(branches)
    result = []
    if geo.M == 0:
        return [torch.zeros_like(t) for t, n in zip((b0, b1, b2, alpha, weight, bias), needs) if n]
    if any(need_x) or need_alpha:
        dx = [torch.empty(b.shape, dtype=b0.dtype, device=b0.device) for b in branches] if any(need_x) else None
        blocks = gemm_blocks(geo.M, geo.F, b0.dtype)
        part = batch_partials(geo, blocks, K * geo.F, alpha.dtype, b0.device) if need_alpha else None
        launch_proj_grad(dy5, weight, branches, alpha, geo, dx, part)
        result += [g.reshape(b0.shape) for g, n in zip(dx or (), need_x) if n]
        if need_alpha:
            result.append(batch_sums(part, geo, B, blocks).view(B, K, geo.F).transpose(1, 2))
    if need_w or need_b:
        more = tuple(branches[1:])
        result += weight_grads(dy5, branches[0], geo, weight, bias, need_w, need_b, more=more, alpha=alpha)
    return result
