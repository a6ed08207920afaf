# MorphFC chunked token FC (mixops.morph_fc), Triton backend.
#
# What it computes. Every axis is ONE GEMM  Y_g = X_g @ W^T (+ bias)  with M rows and F features,
# where X_g is x seen through a chunk index map: GEMM element (row, feature) lives at
# x[b, t, h, w, c] with
#   spatial axes "w" / "h" / "hs" (L = segment_dim, D = C/L, N = H*W, F = C, M = B*T*N):
#       row = ((b*T + t)*(N/L) + k)*L + g     (chunk k, channel group g)
#       feature = p*D + s                      (position p in the chunk, channel s in the group)
#       c = g*D + s, token of (k, p):
#           "w":  n = k*L + p on the row-major sequence n = h*W + w
#           "h":  m = k*L + p on the column-major sequence m = w*H + h
#           "hs": n = p*(N/L) + k (strided chunks) on the row-major sequence
#   temporal axis "t" (G = segment_dim, D = C/G, F = T*D, M = B*H*W*G):
#       row = ((b*H + h)*W + w)*G + g, feature = t*D + s, c = g*D + s.
# Operand rows are gathered through that map in the load stage and the output tile is scattered
# back through the same map in the epilogue: no permuted copy of x ever reaches HBM. The bias is
# indexed by the GEMM feature (p*D + s / t*D + s), not by output channel.
# Backward: dX = scatter(dY_g @ W) -- the same kernel, W not transposed; dW = dY_g^T @ X_g and
# db = colsum(dY_g), reduced over M deterministically: each of SPLIT programs along M writes an
# fp32 (fp64 for fp64) partial and _common.column_sum adds them in a fixed order; SPLIT is a
# function of (M, F, dtype) alone (grad_weight_split), never of the GPU.
#
# FLOPs (numel = M*F = x.numel()): forward 2*numel*F; backward 2*numel*F for dX plus 2*numel*F
# for dW.
# Minimal HBM bytes (e = element size): forward 2*numel*e + F*F*e (read x, write y, read W);
# backward dX 2*numel*e + F*F*e, dW/db 2*numel*e + F*(F+1)*e (read dY and x, write dW, db).
# The deterministic reduction adds SPLIT*F*(F+1)*4 bytes of fp32 partials, written and re-read.
#
# Channel means (mixops::_morph_branch): the forward epilogue also writes fp32 partial sums --
# token maps: per row the sum over chunk positions, [cdiv(F, BLOCK_N), M, D] (extra bytes
# 2*4*M*D*cdiv(F, BLOCK_N) written + re-read, e.g. 29% of y's bf16 bytes at F = 112, D = 8,
# BLOCK_N = 64); channel FC: per tile and batch item a column sum, ~4*F*cdiv(M, BLOCK_M) bytes --
# reduced by _common.column_sum (reduce_mean; no ATen reduction, whose CUDA split follows the
# SM count). Their gradient is added to dY in the dX / dW load stage from a [B, C] fp32 tensor:
# no broadcast gradient in HBM.
# Reweighted operand (NBR = 2 or 3; mixops::_reweighted_proj, kernels/morph_fc_proj.py): the
# forward GEMM's and the dW kernel's operand load forms sum_k alpha[b, f, k] * branch_k from
# NBR branches of one layout, so the channel-FC map (L = 1) runs the proj without the summed
# tensor in HBM; alpha, constant over a batch item's rows, is read as one vector per batch item
# a tile spans (alpha_tile).
# The weight operand loads with a host-checked vector hint (weight_operand): 16-byte copies
# also where the JIT cannot see that a row of F elements is 16-byte aligned (F = 392).
# Offsets are int32 unless a tensor's extent reaches 2**30 (IDX64, host-chosen).
#
# kernels/morph_fc_proj.py (same family) builds its dA kernel from the public pieces here:
# tile_offsets, gemm_mainloop, alpha_tile, batch_colsums (JIT) and geometry, gemm_blocks,
# gathered_vector_width, alpha_items, batch_slots / batch_partials / batch_sums,
# weight_grads, as_video (host).
#
# Grids: forward / dX GEMM: (cdiv(M, BLOCK_M) * cdiv(F, BLOCK_N),), with the F tiles of one row
# block adjacent so its gathered rows are re-read from L2; dW/db: (cdiv(F, BLOCK_N) *
# cdiv(F, BLOCK_F), SPLIT).
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    Blocks,
    accumulate_dtype,
    column_sum,
    deterministic_split,
    dot_dtypes,
    interpreter_gemm_blocks,
    interpreting,
    needs_idx64,
    output_tile,
    strides,
    vector_hint,
    vector_mask,
    vector_width,
    weight_operand,
)


# the AXIS constexpr of the kernels; "w" is the default branch of _row_part / _feat_part
_AXIS_IDS = {"w": 0, "h": 1, "hs": 2, "t": 3}
_AXIS_H = tl.constexpr(_AXIS_IDS["h"])
_AXIS_HS = tl.constexpr(_AXIS_IDS["hs"])
_AXIS_T = tl.constexpr(_AXIS_IDS["t"])


@triton.jit
def _row_part(rows, T, H, W, L, NCH, s_b, s_t, s_h, s_w, s_c, D: tl.constexpr, AXIS: tl.constexpr):
    """(offset, inner digit) of the row part of GEMM rows ``rows`` (a 1-D vector).

    The element (row, feature) sits at row_off + feat_off, corrected by one carry when the
    inner digits of the token sequence index overflow the radix (see _combine). L is the chunk
    length (spatial) or the group count G ("t"), D the channels per group, NCH = H*W/L the
    chunks per frame; s_* are the tensor's strides in elements. All divisions run on this 1-D
    vector, never on a 2-D tile.
    """
    g = rows % L
    r = rows // L
    if AXIS == _AXIS_T:
        w = r % W
        r = r // W
        h = r % H
        b = r // H
        off = b * s_b + h * s_h + w * s_w + g * (D * s_c)
        inner = g * 0
    else:
        k = r % NCH
        r = r // NCH
        t = r % T
        b = r // T
        seq = k if AXIS == _AXIS_HS else k * L
        if AXIS == _AXIS_H:
            inner = seq % H
            off = b * s_b + t * s_t + g * (D * s_c) + (seq // H) * s_w + inner * s_h
        else:
            inner = seq % W
            off = b * s_b + t * s_t + g * (D * s_c) + (seq // W) * s_h + inner * s_w
    return off, inner


@triton.jit
def _feat_part(feats, H, W, NCH, s_t, s_h, s_w, s_c, D: tl.constexpr, AXIS: tl.constexpr):
    """(offset, inner digit) of the feature part of GEMM features ``feats`` (a 1-D vector):
    spatial p*D + s (token k*L + p or k + p*NCH), temporal t*D + s."""
    p = feats // D
    s = feats % D
    if AXIS == _AXIS_T:
        off = p * s_t + s * s_c
        inner = p * 0
    else:
        seq = p * NCH if AXIS == _AXIS_HS else p
        if AXIS == _AXIS_H:
            inner = seq % H
            off = (seq // H) * s_w + inner * s_h + s * s_c
        else:
            inner = seq % W
            off = (seq // W) * s_h + inner * s_w + s * s_c
    return off, inner


@triton.jit
def _combine(row_off, row_in, feat_off, feat_in, H, W, s_h, s_w, AXIS: tl.constexpr):
    """Offsets of the tile row_off + feat_off (broadcast shapes, e.g. [M, 1] and [1, N]): the
    inner digits of the token index sum to < 2R (R = W row-major, H column-major), so an
    overflow is one outer step forward and R inner steps back -- one compare and one select
    per tile element, no division."""
    if AXIS == _AXIS_T:
        offs = row_off + feat_off
    else:
        if AXIS == _AXIS_H:
            R = H
            step = s_w - H * s_h
        else:
            R = W
            step = s_h - W * s_w
        offs = row_off + feat_off + tl.where(row_in + feat_in >= R, step, 0)
    return offs


@triton.jit
def tile_offsets(rows, feats, T, H, W, L, NCH, s_b, s_t, s_h, s_w, s_c,
                  D: tl.constexpr, AXIS: tl.constexpr, ROWS_DIM: tl.constexpr):  # fmt: skip
    """Offsets of the GEMM tile (rows x feats) in a strided [B, T, H, W, C] tensor, as a 2-D
    tile with rows along dimension ROWS_DIM (0: [rows, feats], 1: [feats, rows])."""
    row_off, row_in = _row_part(rows, T, H, W, L, NCH, s_b, s_t, s_h, s_w, s_c, D, AXIS)
    feat_off, feat_in = _feat_part(feats, H, W, NCH, s_t, s_h, s_w, s_c, D, AXIS)
    if ROWS_DIM == 0:
        offs = _combine(row_off[:, None], row_in[:, None], feat_off[None, :], feat_in[None, :], H, W, s_h, s_w, AXIS)
    else:
        offs = _combine(row_off[None, :], row_in[None, :], feat_off[:, None], feat_in[:, None], H, W, s_h, s_w, AXIS)
    return offs


@triton.jit
def _grad_mean_offsets(rows, feats, L, ROWS_PER_B, D: tl.constexpr, ROWS_DIM: tl.constexpr):
    """Offsets into the [B, C] (contiguous) mean gradient of the channel c = g*D + s that GEMM
    element (row, feature) belongs to: batch item row // ROWS_PER_B, g = row % L, s = feat % D."""
    row_off = (rows // ROWS_PER_B) * (L * D) + (rows % L) * D
    s = feats % D
    if ROWS_DIM == 0:
        offs = row_off[:, None] + s[None, :]
    else:
        offs = row_off[None, :] + s[:, None]
    return offs


@triton.jit
def alpha_tile(alpha_ptr, rows, feats, mask, row0, M, F, ROWS_PER_B,
               BRANCH: tl.constexpr, NBR: tl.constexpr, ITEMS: tl.constexpr):  # fmt: skip
    """alpha[row // ROWS_PER_B, feat, BRANCH] for the [rows, feats] tile (broadcastable to it)
    from the [B, F, NBR] contiguous alpha_ptr; row0 is the tile's first row, mask its valid
    elements, M the GEMM rows. alpha is constant across the rows of a batch item, so when the
    host knows no tile spans more than ITEMS = 1 or 2 batch items (alpha_items) it is read as
    one [feats] vector per item (with a per-row select for 2) instead of a per-element gather
    of the whole tile (ITEMS = 0, any tile)."""
    if ITEMS == 0:
        offs = ((rows // ROWS_PER_B) * (F * NBR))[:, None] + (feats * NBR + BRANCH)[None, :]
        a = tl.load(alpha_ptr + offs, mask=mask, other=0.0)
    else:
        feat_ok = feats < F
        first = alpha_ptr + (row0 // ROWS_PER_B) * (F * NBR) + feats * NBR + BRANCH
        a = tl.load(first, mask=feat_ok, other=0.0)[None, :]
        if ITEMS == 2:
            # the next item's vector, read only by the tiles that reach it (about 1 in 49 at
            # MorphMLP stage 3, T = 8: 1568 rows per item, 64-row tiles)
            next_row0 = (row0 // ROWS_PER_B + 1) * ROWS_PER_B
            reached = next_row0 < tl.minimum(row0 + rows.shape[0], M)
            a_next = tl.load(first + F * NBR, mask=feat_ok & reached, other=0.0)
            a = tl.where((rows >= next_row0)[:, None], a_next[None, :], a)
    return a


@triton.jit
def _load_mixed(ptr, ptr1, ptr2, alpha_ptr, offs, rows, feats, mask, row0, M, F, ROWS_PER_B,
                NBR: tl.constexpr, ALPHA_ITEMS: tl.constexpr, VEC: tl.constexpr,
                ACC_DTYPE: tl.constexpr):  # fmt: skip
    """The [rows, feats] operand tile at offs: ptr's elements as stored (NBR == 1), or the
    reweighted sum ((x0*a0 + x1*a1) + x2*a2) of NBR branches that share offs, in ACC_DTYPE,
    with a_k = alpha[row // ROWS_PER_B, feat, k] (alpha_tile; row0 the tile's first row)
    (mixops::_reweighted_proj: the weighted sum never reaches HBM)."""
    v = tl.load(vector_hint(ptr, offs, VEC, 1), mask=mask, other=0.0)
    if NBR > 1:
        a0 = alpha_tile(alpha_ptr, rows, feats, mask, row0, M, F, ROWS_PER_B, 0, NBR, ALPHA_ITEMS)
        v = v.to(ACC_DTYPE) * a0.to(ACC_DTYPE)
        x1 = tl.load(vector_hint(ptr1, offs, VEC, 1), mask=mask, other=0.0).to(ACC_DTYPE)
        a1 = alpha_tile(alpha_ptr, rows, feats, mask, row0, M, F, ROWS_PER_B, 1, NBR, ALPHA_ITEMS)
        v = v + x1 * a1.to(ACC_DTYPE)
        if NBR == 3:
            x2 = tl.load(vector_hint(ptr2, offs, VEC, 1), mask=mask, other=0.0).to(ACC_DTYPE)
            a2 = alpha_tile(alpha_ptr, rows, feats, mask, row0, M, F, ROWS_PER_B, 2, NBR, ALPHA_ITEMS)
            v = v + x2 * a2.to(ACC_DTYPE)
    return v


@triton.jit
def gemm_mainloop(
    a_ptr, a1_ptr, a2_ptr, alpha_ptr, gm_ptr, b_ptr, rows, cols, row_ok, col_ok, row0,
    M, F, T, H, W, L, NCH, ROWS_PER_B, sa_b, sa_t, sa_h, sa_w, sa_c, sb_k, sb_n,
    D: tl.constexpr, AXIS: tl.constexpr, NBR: tl.constexpr, ALPHA_ITEMS: tl.constexpr, GRAD_MEAN: tl.constexpr,
    VEC_A: tl.constexpr, VEC_B: tl.constexpr, DIM_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_M, BLOCK_N] fp32 (fp64) tile sum_f A_g[rows, f] * B[f, cols] of a gathered
    GEMM, reduced over the F features BLOCK_K at a time: A_g loaded through the map by
    _load_mixed (+ grad_mean), B[f, n] = b_ptr[f*sb_k + n*sb_n] with the vector hint VEC_B
    along dimension DIM_B of its [BLOCK_K, BLOCK_N] tile (weight_operand). rows / cols: the
    tile's GEMM rows and columns, row_ok / col_ok their masks, row0 its first row; the other
    arguments as in _gathered_gemm_kernel. Also the mainloop of kernels/morph_fc_proj.py."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < F
        ak_ok = row_ok[:, None] & k_ok[None, :]
        # B first: issued before the gathered operand's address arithmetic, the fp32 dX with
        # grad_mean at F = 392 (16-byte B copies) fits 128 registers without a spill (ptxas -v)
        b_ptrs = vector_hint(b_ptr, ks[:, None] * sb_k + cols[None, :] * sb_n, VEC_B, DIM_B)
        # the mask is constant over each vector too (host: VEC_B divides F); the JIT alone
        # knows F's divisibility only from D, 2 at F = 392 = 28 * 14
        b_ok = vector_mask(k_ok, col_ok, VEC_B, DIM_B)
        b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        a_offs = tile_offsets(rows, ks, T, H, W, L, NCH, sa_b, sa_t, sa_h, sa_w, sa_c, D, AXIS, 0)
        a = _load_mixed(a_ptr, a1_ptr, a2_ptr, alpha_ptr, a_offs, rows, ks, ak_ok, row0, M, F, ROWS_PER_B,
                        NBR, ALPHA_ITEMS, VEC_A, ACC_DTYPE)  # fmt: skip
        a = a.to(ACC_DTYPE)
        if GRAD_MEAN:
            gm_offs = _grad_mean_offsets(rows, ks, L, ROWS_PER_B, D, 0)
            a += tl.load(gm_ptr + gm_offs, mask=ak_ok, other=0.0).to(ACC_DTYPE)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def batch_colsums(val, rows, cols, row_ok, col_ok, M, ROWS_PER_B, part_ptr, pid_m, sp_0, sp_1,
                   BLOCK_M: tl.constexpr):  # fmt: skip
    """Deterministic per-batch-item partials of a tile of token rows: for each of the few
    batch items b0 + j the tile spans, the column sum of val over its rows, stored at
    part_ptr + pid_m*sp_0 + j*sp_1 + cols (b0 = the batch item of the tile's first row;
    slots past the tile's last batch item are not written; batch_sums adds them up)."""
    items = rows // ROWS_PER_B
    b0 = (pid_m * BLOCK_M) // ROWS_PER_B
    b_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // ROWS_PER_B
    for j in range(b_last - b0 + 1):
        mine = ((items == b0 + j) & row_ok)[:, None] & col_ok[None, :]
        colsum = tl.sum(tl.where(mine, val, 0.0), axis=0)
        tl.store(part_ptr + pid_m * sp_0 + j * sp_1 + cols, colsum.to(part_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gathered_gemm_kernel(
    a_ptr, a1_ptr, a2_ptr, alpha_ptr, b_ptr, bias_ptr, c_ptr, gm_ptr, part_ptr,
    M, T, H, W, L, NCH, ROWS_PER_B,
    sa_b, sa_t, sa_h, sa_w, sa_c,
    sb_k, sb_n, s_bias,
    sc_b, sc_t, sc_h, sc_w, sc_c,
    sp_0, sp_1,
    D: tl.constexpr, AXIS: tl.constexpr, NBR: tl.constexpr, ALPHA_ITEMS: tl.constexpr, HAS_BIAS: tl.constexpr,
    GRAD_MEAN: tl.constexpr, MEAN: tl.constexpr, MEAN_DP: tl.constexpr, IDX64: tl.constexpr,
    VEC_A: tl.constexpr, VEC_B: tl.constexpr, DIM_B: tl.constexpr, VEC_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """C_g[m, n] = sum_f A_g[m, f] * B[f, n] (+ bias[n]), A_g / C_g gathered / scattered.

    a_ptr:    [B, T, H, W, C] input of the map (x forward, dY for dX), strides sa_b..sa_c
    a1_ptr, a2_ptr, alpha_ptr: NBR > 1 only (mixops::_reweighted_proj): the other branches,
              strides sa_b..sa_c as a_ptr, and alpha [B, F, NBR] contiguous; A_g is then the
              reweighted branch sum (_load_mixed), alpha read as ALPHA_ITEMS says (alpha_tile)
    b_ptr:    [F, F] matrix read as B[f, n] = b_ptr[f*sb_k + n*sb_n] (W^T forward, W for dX)
    bias_ptr: [F] bias indexed by GEMM feature, stride s_bias (unused unless HAS_BIAS)
    c_ptr:    [B, T, H, W, C] output (y forward, dX backward), strides sc_b..sc_c
    gm_ptr:   [B, C] contiguous, GRAD_MEAN only: added to A_g at every element's (b, c), i.e.
              dY + grad_mean / (T*H*W) broadcast over the tokens, never materialized
    part_ptr: MEAN == 1: [cdiv(F, BLOCK_N), M, D] per-row sums over the chunk positions p of
              the fp32 output tile, part[pid_n, row, s] at pid_n*sp_0 + row*sp_1 + s;
              MEAN == 2 (channel FC, L = 1): [cdiv(M, BLOCK_M), slots, F] column sums of
              the tile over the rows of batch item b0 + j, part[pid_m, j, n] at pid_m*sp_0 +
              j*sp_1 + n (b0 = the batch item of the tile's first row; slots past the tile's
              last batch item are not written)
    M: GEMM rows; F = L*D (spatial) or T*D ("t"); T, H, W, L, NCH: the map (_row_part);
    ROWS_PER_B: GEMM rows per batch item. IDX64: int64 offsets (host: a tensor may exceed
    2**30 elements), else int32. VEC_A / VEC_C: vector hints of a / c along the features
    (vector_width); VEC_B / DIM_B: that of B along dimension DIM_B of its tile (weight_operand).
    DOT_DTYPE: what the operands enter tl.dot as (storage dtype on the GPU, fp32 for half types
    under the interpreter, whose bf16 dot is wrong); ACC_DTYPE fp32, or fp64 for fp64 inputs.
    """
    tl.static_assert(BLOCK_K >= 16)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    # F from the constexpr D: its known divisibility lets the feature masks stay vector-wide
    F = T * D if AXIS == _AXIS_T else L * D
    pid_m, pid_n, rows, cols, row_ok, col_ok = output_tile(M, F, BLOCK_M, BLOCK_N, IDX64)
    acc = gemm_mainloop(
        a_ptr, a1_ptr, a2_ptr, alpha_ptr, gm_ptr, b_ptr, rows, cols, row_ok, col_ok, pid_m.to(rows.dtype) * BLOCK_M,
        M, F, T, H, W, L, NCH, ROWS_PER_B, sa_b, sa_t, sa_h, sa_w, sa_c, sb_k, sb_n,
        D, AXIS, NBR, ALPHA_ITEMS, GRAD_MEAN, VEC_A, VEC_B, DIM_B,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, ACC_DTYPE, PRECISION,
    )  # fmt: skip
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * s_bias, mask=col_ok, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_offs = tile_offsets(rows, cols, T, H, W, L, NCH, sc_b, sc_t, sc_h, sc_w, sc_c, D, AXIS, 0)
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(vector_hint(c_ptr, c_offs, VEC_C, 1), acc.to(c_ptr.dtype.element_ty), mask=out_ok)
    if MEAN == 1:
        # sum over the chunk positions p of features p*D + s: a 0/1 selection matrix on the
        # fp32 tile in full precision (MEAN_DP = D padded to a power of 2 >= 16)
        ss = tl.arange(0, MEAN_DP)
        sel = ((cols[:, None] % D) == ss[None, :]) & col_ok[:, None]
        psum = tl.dot(tl.where(out_ok, acc, 0.0), sel.to(ACC_DTYPE), input_precision="ieee", out_dtype=ACC_DTYPE)
        p_offs = pid_n * sp_0 + rows[:, None] * sp_1 + ss[None, :]
        tl.store(part_ptr + p_offs, psum.to(part_ptr.dtype.element_ty), mask=row_ok[:, None] & (ss[None, :] < D))
    if MEAN == 2:
        batch_colsums(acc, rows, cols, row_ok, col_ok, M, ROWS_PER_B, part_ptr, pid_m, sp_0, sp_1, BLOCK_M)


@triton.jit
def _grad_weight_kernel(
    dy_ptr, x_ptr, x1_ptr, x2_ptr, alpha_ptr, gm_ptr, dw_ptr, db_ptr,
    M, T, H, W, L, NCH, ROWS_PER_B, ROWS_PER_SPLIT,
    sy_b, sy_t, sy_h, sy_w, sy_c,
    sx_b, sx_t, sx_h, sx_w, sx_c,
    sdw_s, sdw_n, sdw_f, sdb_s, sdb_n,
    D: tl.constexpr, AXIS: tl.constexpr, NBR: tl.constexpr, ALPHA_ITEMS: tl.constexpr, HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr, GRAD_MEAN: tl.constexpr, IDX64: tl.constexpr, VEC_Y: tl.constexpr, VEC_X: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Split-M partials of dW = dY_g^T @ X_g and db = colsum(dY_g).

    dy_ptr: [B, T, H, W, C] incoming gradient (may be expanded), strides sy_b..sy_c
    x_ptr:  [B, T, H, W, C] forward input, strides sx_b..sx_c (unused unless HAS_DW)
    x1_ptr, x2_ptr, alpha_ptr: NBR > 1 only: X_g is the reweighted branch sum recomputed in
            the load stage (_load_mixed; branches strided as x_ptr, alpha [B, F, NBR] read as
            ALPHA_ITEMS says for tiles of BLOCK_M rows)
    gm_ptr: [B, C] contiguous, GRAD_MEAN only: added to dY at every element's (b, c)
    dw_ptr: [SPLIT, F, F] partials, dw[s, n, f] at s*sdw_s + n*sdw_n + f*sdw_f (if HAS_DW)
    db_ptr: [SPLIT, F] partials, db[s, n] at s*sdb_s + n*sdb_n (if HAS_DB; written by the
            programs of the first F tile only)
    Program (pid, split) covers GEMM rows [split*ROWS_PER_SPLIT, (split+1)*ROWS_PER_SPLIT) of
    the output tile (pid // cdiv(F, BLOCK_F), pid % cdiv(F, BLOCK_F)); the reduction axis of
    its dot is BLOCK_M rows. The map arguments are those of _gathered_gemm_kernel.
    """
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_F >= 16)
    F = T * D if AXIS == _AXIS_T else L * D
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_f = tl.cdiv(F, BLOCK_F) if HAS_DW else 1
    pid_n = pid // num_f
    pid_f = pid % num_f
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    n_ok = ns < F
    f_ok = fs < F
    if IDX64:
        start = split.to(tl.int64) * ROWS_PER_SPLIT
    else:
        start = split * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < end
        dy_ok = n_ok[:, None] & m_ok[None, :]
        dy_offs = tile_offsets(ms, ns, T, H, W, L, NCH, sy_b, sy_t, sy_h, sy_w, sy_c, D, AXIS, 1)
        dy_t = tl.load(vector_hint(dy_ptr, dy_offs, VEC_Y, 0), mask=dy_ok, other=0.0).to(ACC_DTYPE)
        if GRAD_MEAN:
            gm_offs = _grad_mean_offsets(ms, ns, L, ROWS_PER_B, D, 1)
            dy_t += tl.load(gm_ptr + gm_offs, mask=dy_ok, other=0.0).to(ACC_DTYPE)
        if HAS_DW:
            x_offs = tile_offsets(ms, fs, T, H, W, L, NCH, sx_b, sx_t, sx_h, sx_w, sx_c, D, AXIS, 0)
            xg = _load_mixed(x_ptr, x1_ptr, x2_ptr, alpha_ptr, x_offs, ms, fs, m_ok[:, None] & f_ok[None, :],
                             m0, M, F, ROWS_PER_B, NBR, ALPHA_ITEMS, VEC_X, ACC_DTYPE)  # fmt: skip
            acc = tl.dot(dy_t.to(DOT_DTYPE), xg.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DB:
            db_acc += tl.sum(dy_t, axis=1)
    if HAS_DW:
        dw_offs = split.to(tl.int64) * sdw_s + ns[:, None] * sdw_n + fs[None, :] * sdw_f
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & f_ok[None, :])
    if HAS_DB:
        db_offs = split.to(tl.int64) * sdb_s + ns * sdb_n
        tl.store(db_ptr + db_offs, db_acc.to(db_ptr.dtype.element_ty), mask=n_ok & (pid_f == 0))


# ---------------------------------------------------------------------------------------------
# Geometry and block-size heuristics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The gather map of one call: GEMM size (M, F), the map's integer parameters, and the
    GEMM rows per batch item (for the mean and its gradient)."""

    axis: int
    M: int
    F: int
    T: int
    H: int
    W: int
    L: int
    D: int
    NCH: int
    rows_per_b: int

    @property
    def args(self) -> tuple[int, ...]:
        """The runtime map arguments of the kernels (D is a constexpr)."""
        return (self.M, self.T, self.H, self.W, self.L, self.NCH, self.rows_per_b)


def geometry(shape5: tuple[int, ...], segment_dim: int, axis: str) -> Geometry:
    """The map for x of shape [B, T, H, W, C] (validated by mixops.ops.morph_fc). Axis "c" is
    the plain channel FC of mlp_c: the "w" map with L = 1 (row = token, feature = channel)."""
    B, T, H, W, C = shape5
    if axis == "c":
        return Geometry(_AXIS_IDS["w"], B * T * H * W, C, T, H, W, 1, C, H * W, T * H * W)
    D = C // segment_dim
    if axis == "t":
        return Geometry(_AXIS_IDS[axis], B * H * W * segment_dim, T * D, T, H, W, segment_dim, D, 1, H * W * segment_dim)
    return Geometry(_AXIS_IDS[axis], B * T * H * W, C, T, H, W, segment_dim, D, H * W // segment_dim, T * H * W)


def gemm_blocks(M: int, F: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the gathered GEMM (forward and dX): m = BLOCK_M rows, n = BLOCK_N features,
    k = BLOCK_K reduction step. 64x64 tiles: on sm_90 the 128x128 (and 128x64) half-type tiles
    spill once the channel-mean epilogue is compiled in (ptxas -v, tests/test_morph_fc_sm90.py),
    and fp32 needs the 16-deep reduction step to stay spill-free."""
    if interpreting():
        return interpreter_gemm_blocks(M, F, F)
    if dtype == torch.float64:
        return Blocks(m=64, n=32, k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(m=64, n=64, k=16, num_warps=4, num_stages=3)
    return Blocks(m=64, n=64, k=32, num_warps=4, num_stages=3)


def grad_weight_blocks(M: int, F: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the dW/db kernel: m = BLOCK_N (dW rows), n = BLOCK_F (dW columns), k = BLOCK_M
    (the GEMM rows reduced per step); spill-free on sm_90 (tests/test_morph_fc_sm90.py). Under
    the interpreter the forward's tiles transposed: the GEMM rows it takes are the reduction."""
    if interpreting():
        b = interpreter_gemm_blocks(M, F, F)
        return Blocks(m=b.n, n=b.n, k=b.m, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return Blocks(m=32, n=32, k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(m=64, n=32, k=16, num_warps=4, num_stages=2)
    return Blocks(m=128, n=128, k=32, num_warps=8, num_stages=2)


def grad_weight_split(M: int, F: int, dtype: torch.dtype) -> int:
    """How many fixed row ranges dW/db is split into (the first dimension of the partials
    launch_grad_weight fills): deterministic_split over the M GEMM rows for the dW tiles of
    grad_weight_blocks -- a function of (M, F, dtype) alone, so dW has the same bits on every
    GPU model."""
    blocks = grad_weight_blocks(M, F, dtype)
    tiles = triton.cdiv(F, blocks.m) * triton.cdiv(F, blocks.n)
    return deterministic_split(M, blocks.k, tiles)


def alpha_items(rows_per_b: int, block_rows: int) -> int:
    """How the kernels read alpha for tiles of ``block_rows`` consecutive GEMM rows that start at
    multiples of block_rows (ALPHA_ITEMS of alpha_tile): 1 when no tile spans two batch items
    (rows_per_b a multiple of block_rows: MorphMLP stages 1-2 at T = 8), 2 when none spans three
    (rows_per_b >= block_rows: stages 3-4), 0 otherwise (a per-element gather)."""
    if rows_per_b % block_rows == 0:
        return 1
    return 2 if rows_per_b >= block_rows else 0


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def gathered_vector_width(t: torch.Tensor, D: int) -> int:
    """The vector hint (VEC_*) of a gathered operand t [B, T, H, W, C]: runs of D channels
    are contiguous in every chunk map, so vector_width along the channels with extent D."""
    return vector_width(t, -1, D)


def _mean_dp(D: int) -> int:
    """The selection matrix width of the MEAN == 1 epilogue: D padded to a power of 2 >= 16."""
    return max(16, triton.next_power_of_2(D))


def launch_gemm(
    a5: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out5: torch.Tensor,
    geo: Geometry,
    transpose_weight: bool,
    grad_mean: torch.Tensor | None = None,
    mean_part: torch.Tensor | None = None,
    more: tuple[torch.Tensor, ...] = (),
    alpha: torch.Tensor | None = None,
) -> None:
    """out5 <- scatter(gather(a5 [+ grad_mean]) @ (weight^T if transpose_weight else weight)
    (+ bias)), and optionally the channel-mean partials of the output.

    a5, out5: [B, T, H, W, C] of any strides (out5 must not overlap itself); weight [F, F].
    grad_mean: None or [B, C] contiguous, added at every element's (batch item, channel).
    mean_part: None or the buffer of mean_partials(geo, ...) for the output's channel means.
    more, alpha: one or two further branches with a5's strides and alpha [B, F, 1 + len(more)]
    contiguous: the GEMM operand is then the reweighted branch sum (_load_mixed).
    """
    if geo.M == 0:
        return
    blocks = gemm_blocks(geo.M, geo.F, a5.dtype)
    dot_dtype, acc_dtype, precision = dot_dtypes(a5.dtype)
    sb_k, sb_n, vec_b, dim_b = weight_operand(weight, transpose_weight, geo.F)
    mean = 0 if mean_part is None else _mean_mode(geo)
    if mean == 2:
        slots = batch_slots(geo, blocks)
        mean_strides = (slots * mean_part.stride(0), mean_part.stride(0))
    else:
        mean_strides = mean_part.stride()[:2] if mean_part is not None else (0, 0)
    a1, a2 = _branch_pointers(a5, more)
    grid = (triton.cdiv(geo.M, blocks.m) * triton.cdiv(geo.F, blocks.n),)
    _gathered_gemm_kernel[grid](
        a5, a1, a2, alpha if alpha is not None else a5, weight, bias if bias is not None else weight, out5,
        grad_mean if grad_mean is not None else weight, mean_part if mean_part is not None else weight,
        *geo.args,
        *strides(a5),
        sb_k, sb_n, bias.stride(0) if bias is not None else 0,
        *strides(out5),
        *mean_strides,
        D=geo.D, AXIS=geo.axis, NBR=1 + len(more), ALPHA_ITEMS=alpha_items(geo.rows_per_b, blocks.m),
        HAS_BIAS=bias is not None, GRAD_MEAN=grad_mean is not None,
        MEAN=mean, MEAN_DP=_mean_dp(geo.D), IDX64=needs_idx64(a5, *more, out5, grad_mean, mean_part),
        VEC_A=min(gathered_vector_width(t, geo.D) for t in (a5, *more)), VEC_B=vec_b, DIM_B=dim_b,
        VEC_C=gathered_vector_width(out5, geo.D),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def _branch_pointers(a5: torch.Tensor, more: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The a1 / a2 pointers of a launch with the extra branches ``more`` (a5 where absent);
    the kernels address every branch with a5's strides."""
    if any(strides(t) != strides(a5) for t in more):
        raise ValueError("the reweighted branches must share one memory layout")
    return (*more, a5, a5)[:2]


def _mean_mode(geo: Geometry) -> int:
    """The MEAN epilogue of a map: 1 (per-row sums over chunk positions) for the token maps,
    2 (per-tile column sums per batch item) for the channel FC (L = 1, row = token)."""
    return 2 if geo.L == 1 and geo.axis != _AXIS_IDS["t"] else 1


def batch_slots(geo: Geometry, blocks: Blocks) -> int:
    """How many batch items a tile of blocks.m consecutive rows can touch: the slots per tile
    of batch_partials' buffer (MEAN 2, and the dalpha partials of kernels/morph_fc_proj.py)."""
    return triton.cdiv(blocks.m - 1, geo.rows_per_b) + 1


def mean_partials(geo: Geometry, dtype: torch.dtype, device) -> torch.Tensor:
    """The partial-sum buffer of launch_gemm's channel means (fp32; fp64 for fp64).

    MEAN 1 (token maps): [cdiv(F, BLOCK_N), M, D]; MEAN 2 (channel FC): [tiles * slots + 1,
    F], the [tiles, slots, F] partials of the kernel plus one zero row that the reduction's
    padded gather reads (reduce_mean)."""
    blocks = gemm_blocks(geo.M, geo.F, dtype)
    part_dtype = accumulate_dtype(dtype)
    if _mean_mode(geo) == 1:
        return torch.empty((triton.cdiv(geo.F, blocks.n), geo.M, geo.D), dtype=part_dtype, device=device)
    return batch_partials(geo, blocks, geo.F, part_dtype, device)


def batch_partials(geo: Geometry, blocks: Blocks, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The [tiles * slots + 1, width] buffer of batch_colsums over the tiles of blocks.m
    token rows: the kernel's [tiles, slots, width] partials plus one zero row that
    batch_sums' padded gather reads."""
    rows = triton.cdiv(geo.M, blocks.m) * batch_slots(geo, blocks)
    part = torch.empty((rows + 1, width), dtype=dtype, device=device)
    part[rows].zero_()
    return part


def batch_sums(part: torch.Tensor, geo: Geometry, batch: int, blocks: Blocks) -> torch.Tensor:
    """[B, width] per-batch-item sums of batch_partials' buffer in a fixed order (a padded
    gather, then column_sum over the cdiv(rows_per_b, BLOCK_M) + 1 slots of each item, past
    256 for video): the same bits on every GPU."""
    slots = batch_slots(geo, blocks)
    # tiles overlapping batch item b: first..last; slot of b in tile t: b - (t*BLOCK_M) // rows_per_b
    b = torch.arange(batch, device=part.device)
    first = b * geo.rows_per_b // blocks.m
    last = ((b + 1) * geo.rows_per_b - 1) // blocks.m
    tiles = first[:, None] + torch.arange(triton.cdiv(geo.rows_per_b, blocks.m) + 1, device=part.device)
    slot = b[:, None] - tiles * blocks.m // geo.rows_per_b
    index = torch.where(tiles <= last[:, None], tiles * slots + slot, part.shape[0] - 1)
    return column_sum(part[index])


def reduce_mean(part: torch.Tensor, geo: Geometry, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, C] channel means over the T*H*W tokens from mean_partials' buffer, in a fixed order
    (column_sum; for MEAN 2 after batch_sums' padded gather): the same bits on every GPU.
    dtype: the storage dtype of the launch (it chose the tiles).

    MEAN 1 sums [cdiv(F, BLOCK_N), B, rows_per_b / L, L·D] over its first and third axes, which
    share no stride: column_sum first adds the rows_per_b / L rows of each (column block, batch
    item) -- the long reduction -- then the cdiv(F, BLOCK_N) <= 13 results of each output in a
    tiny [1, blocks, B·C] pass, rather than first folding the blocks into a second M·D partial."""
    tokens = geo.rows_per_b if _mean_mode(geo) == 2 else geo.T * geo.H * geo.W
    if _mean_mode(geo) == 1:
        blocks = part.shape[0]
        per_block = column_sum(part.view(blocks * batch, -1, geo.L * geo.D))  # [blocks * B, C]
        return column_sum(per_block.view(1, blocks, batch * geo.L * geo.D)).view(batch, -1) / tokens
    return batch_sums(part, geo, batch, gemm_blocks(geo.M, geo.F, dtype)) / tokens


def launch_grad_weight(
    dy5: torch.Tensor,
    x5: torch.Tensor,
    geo: Geometry,
    dw_part: torch.Tensor | None,
    db_part: torch.Tensor | None,
    grad_mean: torch.Tensor | None = None,
    more: tuple[torch.Tensor, ...] = (),
    alpha: torch.Tensor | None = None,
) -> None:
    """Fill the split partials dw_part [SPLIT, F, F] and/or db_part [SPLIT, F] (any strides;
    SPLIT from their first dimension) from dY (+ grad_mean [B, C] contiguous at every
    element's batch item and channel) and x, both [B, T, H, W, C] of any strides; with
    ``more`` / ``alpha`` (as launch_gemm) X is the reweighted sum of x and ``more``."""
    part = dw_part if dw_part is not None else db_part
    split = part.shape[0]
    blocks = grad_weight_blocks(geo.M, geo.F, dy5.dtype)
    dot_dtype, acc_dtype, precision = dot_dtypes(dy5.dtype)
    rows_per_split = triton.cdiv(triton.cdiv(geo.M, split), blocks.k) * blocks.k
    num_f = triton.cdiv(geo.F, blocks.n) if dw_part is not None else 1
    x1, x2 = _branch_pointers(x5, more)
    grid = (triton.cdiv(geo.F, blocks.m) * num_f, split)
    _grad_weight_kernel[grid](
        dy5, x5, x1, x2, alpha if alpha is not None else x5, grad_mean if grad_mean is not None else part,
        part if dw_part is None else dw_part, part if db_part is None else db_part,
        *geo.args, rows_per_split,
        *strides(dy5),
        *strides(x5),
        *(dw_part.stride() if dw_part is not None else (0, 0, 0)),
        *(db_part.stride() if db_part is not None else (0, 0)),
        D=geo.D, AXIS=geo.axis, NBR=1 + len(more), ALPHA_ITEMS=alpha_items(geo.rows_per_b, blocks.k),
        HAS_DW=dw_part is not None, HAS_DB=db_part is not None,
        GRAD_MEAN=grad_mean is not None, IDX64=needs_idx64(dy5, x5, *more, grad_mean),
        VEC_Y=gathered_vector_width(dy5, geo.D), VEC_X=min(gathered_vector_width(t, geo.D) for t in (x5, *more)),
        BLOCK_N=blocks.m, BLOCK_F=blocks.n, BLOCK_M=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def weight_grads(
    dy5: torch.Tensor, x5: torch.Tensor, geo: Geometry, weight: torch.Tensor, bias: torch.Tensor | None,
    need_w: bool, need_b: bool, **launch,
) -> list[torch.Tensor]:
    """[dW][, db], those flagged, in weight's / bias's dtype: launch_grad_weight (``launch``: its
    grad_mean / more / alpha) into grad_weight_split partials (fp32; fp64 for fp64), added up
    by column_sum in a fixed order."""
    split = grad_weight_split(geo.M, geo.F, x5.dtype)
    part_dtype = accumulate_dtype(x5.dtype)
    dw_part = torch.empty((split, geo.F, geo.F), dtype=part_dtype, device=x5.device) if need_w else None
    db_part = torch.empty((split, geo.F), dtype=part_dtype, device=x5.device) if need_b else None
    launch_grad_weight(dy5, x5, geo, dw_part, db_part, **launch)
    return [
        column_sum(p.view(1, split, -1)).view(p.shape[1:]).to(t.dtype)
        for p, t in ((dw_part, weight), (db_part, bias))
        if p is not None
    ]


# ---------------------------------------------------------------------------------------------
# Registry entry points (mixops.backend.register("morph_fc", "triton", ...))
# ---------------------------------------------------------------------------------------------


def as_video(t: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] as a clip of one frame [B, 1, H, W, C] (a view, strides kept); a
    [B, T, H, W, C] tensor as it is."""
    return t if t.dim() == 5 else t.unsqueeze(1)


def forward(x, weight, bias, segment_dim, axis):
    """The ``triton`` forward of ``mixops::morph_fc``: a fresh contiguous tensor of x's shape."""
    x5 = as_video(x)
    out = torch.empty(x5.shape, dtype=x.dtype, device=x.device)
    launch_gemm(x5, weight, bias, out, geometry(tuple(x5.shape), segment_dim, axis), transpose_weight=True)
    return out.reshape(x.shape)


def backward(grads, needs, x, weight, bias, segment_dim, axis):
    """The ``triton`` backward: gradients of the flagged inputs among (x, weight, bias)."""
    need_x, need_w, need_b = needs
    x5 = as_video(x)
    dy5 = as_video(grads[0])
    geo = geometry(tuple(x5.shape), segment_dim, axis)
    result = []
    if need_x:
        dx = torch.empty(x5.shape, dtype=x.dtype, device=x.device)
        launch_gemm(dy5, weight, None, dx, geo, transpose_weight=False)
        result.append(dx.reshape(x.shape))
    if need_w or need_b:
        result += weight_grads(dy5, x5, geo, weight, bias, need_w, need_b)
    return result


def branch_forward(x, weight, bias, segment_dim, axis):
    """The ``triton`` forward of ``mixops::_morph_branch``: (y, mean) with y the branch output
    (axis "c": the channel FC) and mean [B, C] its fp32 (fp64 for fp64) mean over the tokens,
    summed from the GEMM epilogue's partials (no second pass over y)."""
    x5 = as_video(x)
    geo = geometry(tuple(x5.shape), segment_dim, axis)
    out = torch.empty(x5.shape, dtype=x.dtype, device=x.device)
    part = mean_partials(geo, x.dtype, x.device)
    launch_gemm(x5, weight, bias, out, geo, transpose_weight=True, mean_part=part)
    if geo.M == 0:
        return out.reshape(x.shape), torch.zeros((x5.shape[0], x5.shape[-1]), dtype=part.dtype, device=x.device)
    return out.reshape(x.shape), reduce_mean(part, geo, x5.shape[0], x.dtype)


def branch_backward(grads, needs, x, weight, bias, segment_dim, axis):
    """The ``triton`` backward of ``mixops::_morph_branch``: the dX / dW / db kernels with
    grad_mean / (T*H*W) added to dY in their load stage (never broadcast in HBM)."""
    need_x, need_w, need_b = needs
    x5 = as_video(x)
    dy5 = as_video(grads[0])
    geo = geometry(tuple(x5.shape), segment_dim, axis)
    tokens = x5.shape[1] * x5.shape[2] * x5.shape[3]
    gm = (grads[1].to(accumulate_dtype(x.dtype)) / max(tokens, 1)).contiguous()
    result = []
    if need_x:
        dx = torch.empty(x5.shape, dtype=x.dtype, device=x.device)
        launch_gemm(dy5, weight, None, dx, geo, transpose_weight=False, grad_mean=gm)
        result.append(dx.reshape(x.shape))
    if need_w or need_b:
        result += weight_grads(dy5, x5, geo, weight, bias, need_w, need_b, grad_mean=gm)
    return result
