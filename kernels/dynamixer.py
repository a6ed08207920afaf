# DynaMixer's token mixing (mixops::dynamixer_mix), Triton backend.
#
# What it computes (docs/dynamixer.md section 3). x [B', N, C]; S segments of E = C/S channels;
# d reduced features:
#   r = x Wc^T + bc                            [B', N, S*d]   compress: dense over all C
#   z[b, s, l*d + k] = r[b, l, s*d + k]         [B', S, N*d]   token-major generate input
#   G = z Wg^T + bg,  logit (p, q) = G[.., p*N + q]            generate: shared by the segments
#   P = softmax over the source token p         (every column q of P sums to one)
#   y[b, q, s*E + e] = sum_p P[b, s, p, q] x[b, p, s*E + e]
#
# Why fused. The official op writes and re-reads r, z, G, the softmax P and the permuted mixing
# result: at DynaMixer-S stage 1 (B = 128: B' = 4096 sequences, N = 32, S = 8, C = 192) G and P
# hold B'*S*N*N = 33.6 M values each, 1.33x the 25.2 M of x, in fp32, written and read several
# times per direction. Here one program takes a tile of sequences through the whole chain on
# chip: HBM sees x (read again from L2 for the mixing), the weights (from L2) and y. The N x N
# logits live one q-block (QB output tokens, all N sources) at a time, so a program never holds
# more than [BB*S, N, QB] of them.
#
# Backward, without P in memory (docs/dynamixer.md sections 8 and 10). Nothing is saved by the
# forward; each launch that needs P recomputes z, G and P q-block by q-block:
#   _mix_input_grad_kernel  dx = P dY_s (the mixing's share), 16 channels per program
#   _logit_grad_kernel      dP = X_s dY_s^T, dG = P * (dP - sum_p P * dP), dz = dG Wg, written as
#                           dr (compress's output gradient, fp32, B'*N*S*d values: 1/12 of x at
#                           stage 1), and dr Wc added to dx
#   _generate_grad_kernel   dWg = dG^T z, dbg: a program per q-block of Wg's rows, l-block of its
#                           columns and fixed range of sequence tiles, its dWg block in registers;
#                           the ranges' partials added in a fixed order (column_sum)
#   kernels/_weight_grad.py dWc = dr^T x, dbc = sum dr
#
# Sequences: every kernel sees x (and y, dY, dx, dr) as a [B0, B1, N, C] view, sequence b at
# (b // B1)*stride0 + (b % B1)*stride1 (sequences()): the public op's [B', N, C] is B1 = 1, the
# DynaMixerBlock's rows are its [B, H, W, C] map and its columns the H, W transpose of the map,
# read and written where they lie (mixops::_dynamixer_axis_mix; docs/dynamixer.md section 11).
# The block's pass 2 (mixops::_dynamixer_reweighted, the end of this file) is the reweighted
# K = 3C branch GEMM of kernels/_reweighted_mix.py.
#
# Padding: every tile axis is a power of two (tl.dot, tl.reshape): NP >= N tokens, SP >= S
# segments, EP >= E channels, DP >= d features, all at least what tl.dot needs (16) where they
# are a dot's dimension (dynamixer_tiles). Padded sources get -inf logits; padded channels,
# features and sequences load zeros and store nothing, which keeps them out of every sum.
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import column_sum, deterministic_split, dot_dtypes, needs_idx64, strides
from ._reweighted_mix import branch_backward, launch_mix, token_sums
from ._weight_grad import linear_param_grads


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """The padded tile of one program (constexprs of every kernel here)."""

    bb: int  # sequences per tile (BB): BB*SP >= 16 rows (b, s) for the generate GEMM
    sp: int  # segments S, padded
    np: int  # tokens N, padded
    dp: int  # reduced features d, padded: SP*DP and NP*DP >= 16
    ep: int  # channels per segment E, padded
    qb: int  # output tokens per q-block (the logits' column block)
    lb: int  # source tokens per l-block of dWg's columns (the generate-grad kernel)
    eb: int  # channels per block of dx's mixing share (the mix-input-grad kernel)
    num_warps: int


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def dynamixer_tiles(N: int, S: int, E: int, d: int) -> Tiles:
    """Tile sizes: every tl.dot dimension >= 16 and a power of two; a q-block of 16 output
    tokens (so the [BB*SP, NP, QB] logits of DynaMixer-S stage 1 are 8K values); dWg's register
    block NP*QB x LB*DP kept at <= 8K values; dx's mixing share in blocks of 16 channels."""
    sp, np_ = _pow2(S), _pow2(N, 16)
    dp = _pow2(d, max(16 // sp, 1))
    ep = _pow2(E, 16)
    bb = max(16 // sp, 1)
    qb = 16
    lb = min(np_, max(8192 // (np_ * qb * dp), 16 // dp, 1))
    return Tiles(bb=bb, sp=sp, np=np_, dp=dp, ep=ep, qb=qb, lb=lb, eb=16, num_warps=8)


# ---------------------------------------------------------------------------------------------
# Shared device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sequence_offsets(b, B1, s_b0, s_b1):
    """Offset of sequence b = (b // B1, b % B1) of a [B0, B1, N, C] tensor: the H branch's
    sequences are the columns (b, w) of [B, H, W, C], two strides apart, read where they lie."""
    return (b // B1) * s_b0 + (b % B1) * s_b1


@triton.jit
def _token_tile(b0, Bp, N, E, B1, s_b0, s_b1, s_n, s_c, IDX64: tl.constexpr, BB: tl.constexpr, T: tl.constexpr,
                EP: tl.constexpr, SEG):  # fmt: skip
    """Offsets and mask of the [BB*T, EP] tile of channels SEG*E + e (one segment) of tokens t
    of sequences b0 + b, row b*T + t, in a [B0, B1, N, C] tensor of strides s_b0, s_b1, s_n,
    s_c (Bp = B0*B1 sequences)."""
    rows = tl.arange(0, BB * T)
    b = b0 + rows // T
    if IDX64:
        b = b.to(tl.int64)
    t = rows % T
    e = tl.arange(0, EP)
    offs = _sequence_offsets(b, B1, s_b0, s_b1)[:, None] + t[:, None] * s_n + (SEG * E + e)[None, :] * s_c
    return offs, ((b < Bp) & (t < N))[:, None] & (e < E)[None, :]


@triton.jit
def _segment_tile(b0, t0, Bp, N, S, E, B1, s_b0, s_b1, s_n, s_c, IDX64: tl.constexpr, BB: tl.constexpr,
                  SP: tl.constexpr, T: tl.constexpr, EP: tl.constexpr, e0=0):  # fmt: skip
    """Offsets and mask of the [BB*SP, T, EP] tile (row (b, s), token t0 + t, channel
    s*E + e0 + e) of a [B0, B1, N, C] tensor of strides s_b0, s_b1, s_n, s_c: each segment's
    sources or outputs (or a block of EP of their channels from e0)."""
    rows = tl.arange(0, BB * SP)
    b = b0 + rows // SP
    if IDX64:
        b = b.to(tl.int64)
    s = rows % SP
    t = t0 + tl.arange(0, T)
    e = e0 + tl.arange(0, EP)
    offs = (_sequence_offsets(b, B1, s_b0, s_b1) + s * E * s_c)[:, None, None] + (t * s_n)[None, :, None] + (e * s_c)[None, None, :]
    mask = ((b < Bp) & (s < S))[:, None, None] & (t < N)[None, :, None] & (e < E)[None, None, :]
    return offs, mask


@triton.jit
def _compress_weight_rows(S, D, SP: tl.constexpr, DP: tl.constexpr):
    """compress's output feature s*d + k of padded column (s, k) of the [.., SP*DP] r tile."""
    f = tl.arange(0, SP * DP)
    return (f // DP) * D + f % DP, (f // DP < S) & (f % DP < D)


@triton.jit
def _compressed(
    x_ptr, cw_ptr, cb_ptr, b0, Bp, N, S, E, D, B1, sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb,
    IDX64: tl.constexpr, BB: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """z [BB*SP, NP*DP] (ACC_DTYPE): the generate input of sequences b0 + b, segment s (row
    b*SP + s), token l (column l*DP + k) -- compress over all C channels, one segment of
    channels per K step, then the (token, segment) transpose in registers."""
    f, f_ok = _compress_weight_rows(S, D, SP, DP)
    e = tl.arange(0, EP)
    r = tl.zeros([BB * NP, SP * DP], dtype=ACC_DTYPE)
    for seg in range(0, S):
        offs, mask = _token_tile(b0, Bp, N, E, B1, sx_b0, sx_b1, sx_n, sx_c, IDX64, BB, NP, EP, seg)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        # W^T block [EP, SP*DP]: element (e, (s, k)) = Wc[s*d + k, seg*E + e]
        w = tl.load(cw_ptr + f[None, :] * scw_o + (seg * E + e)[:, None] * scw_i,
                    mask=(e < E)[:, None] & f_ok[None, :], other=0.0)  # fmt: skip
        r = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), r, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    r += tl.load(cb_ptr + f * scb, mask=f_ok, other=0.0).to(ACC_DTYPE)[None, :]
    return tl.reshape(tl.permute(tl.reshape(r, [BB, NP, SP, DP]), (0, 2, 1, 3)), [BB * SP, NP * DP])


@triton.jit
def _generate_block(gw_ptr, q0, N, D, sgw_o, sgw_i, NP: tl.constexpr, DP: tl.constexpr, QB: tl.constexpr):
    """generate's weight rows p*N + q0 + j (all sources p, QB outputs) as Wg^T [NP*DP, NP*QB]:
    column p*QB + j, row l*DP + k for input l*d + k; zeros outside the weight."""
    i = tl.arange(0, NP * DP)
    j = tl.arange(0, NP * QB)
    p = j // QB
    q = q0 + j % QB
    mask = ((i // DP < N) & (i % DP < D))[:, None] & ((p < N) & (q < N))[None, :]
    return tl.load(gw_ptr + (p * N + q)[None, :] * sgw_o + ((i // DP) * D + i % DP)[:, None] * sgw_i, mask=mask,
                   other=0.0)  # fmt: skip


@triton.jit
def _logits(
    z, gw_ptr, gb_ptr, q0, N, D, sgw_o, sgw_i, sgb,
    R: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr, QB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """G [R, NP, QB]: the logits (p, q0 + j) of every row of z [R, NP*DP], -inf at padded
    sources p >= N."""
    w = _generate_block(gw_ptr, q0, N, D, sgw_o, sgw_i, NP, DP, QB).to(DOT_DTYPE)
    g = tl.dot(z.to(DOT_DTYPE), w, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    j = tl.arange(0, NP * QB)
    o = (j // QB) * N + q0 + j % QB
    g += tl.load(gb_ptr + o * sgb, mask=(j // QB < N) & (q0 + j % QB < N), other=0.0).to(ACC_DTYPE)[None, :]
    g = tl.reshape(g, [R, NP, QB])
    return tl.where((tl.arange(0, NP) < N)[None, :, None], g, float("-inf"))


@triton.jit
def _column_softmax(g):
    """softmax over axis 1 (the source token p) of [R, NP, QB] logits."""
    e = tl.exp(g - tl.max(g, axis=1)[:, None, :])
    return e / tl.sum(e, axis=1)[:, None, :]


@triton.jit
def _logit_grad(
    z, xs, gw_ptr, gb_ptr, dy_ptr, b0, q0, Bp, N, S, E, D, B1, sgw_o, sgw_i, sgb, sdy_b0, sdy_b1, sdy_n, sdy_c,
    IDX64: tl.constexpr, BB: tl.constexpr, SP: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
    QB: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dG [BB*SP, NP, QB] of q-block q0: P recomputed from z, dP = X_s dY_s^T (xs [BB*SP, NP, EP]
    the sources), then the softmax backward down each column."""
    R: tl.constexpr = BB * SP
    pm = _column_softmax(_logits(z, gw_ptr, gb_ptr, q0, N, D, sgw_o, sgw_i, sgb, R, NP, DP, QB, DOT_DTYPE, ACC_DTYPE,
                                 PRECISION))  # fmt: skip
    dy_offs, dy_mask = _segment_tile(b0, q0, Bp, N, S, E, B1, sdy_b0, sdy_b1, sdy_n, sdy_c, IDX64, BB, SP, QB, EP)
    # zeros outside the problem: dG is then zero on padded rows and columns
    dyb = tl.load(dy_ptr + dy_offs, mask=dy_mask, other=0.0).to(DOT_DTYPE)  # [R, QB, EP]
    dp = tl.dot(xs, tl.permute(dyb, (0, 2, 1)), input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return pm * (dp - tl.sum(pm * dp, axis=1)[:, None, :])


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mix_forward_kernel(
    x_ptr, cw_ptr, cb_ptr, gw_ptr, gb_ptr, y_ptr,
    Bp, B1, N, S, E, D,
    sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb, sgw_o, sgw_i, sgb, sy_b0, sy_b1, sy_n, sy_c,
    IDX64: tl.constexpr, BB: tl.constexpr, SP: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr,
    EP: tl.constexpr, QB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """y = dynamixer_mix(x) for the BB sequences of program b0 = pid*BB.

    x_ptr:  [B0, B1, N, C] strides sx_b0, sx_b1, sx_n, sx_c;  y_ptr: the same shape, strides sy_*
    cw_ptr: [S*d, C] compress weight (scw_o, scw_i), cb_ptr [S*d] (scb)
    gw_ptr: [N*N, N*d] generate weight (sgw_o, sgw_i), gb_ptr [N*N] (sgb)
    Sequence b is (b // B1, b % B1); Bp = B' = B0*B1, C = S*E, D = d. IDX64: int64 sequence
    offsets (host-chosen).
    """
    R: tl.constexpr = BB * SP
    b0 = tl.program_id(0) * BB
    z = _compressed(x_ptr, cw_ptr, cb_ptr, b0, Bp, N, S, E, D, B1, sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb,
                    IDX64, BB, NP, SP, DP, EP, DOT_DTYPE, ACC_DTYPE, PRECISION)  # fmt: skip
    x_offs, x_mask = _segment_tile(b0, 0, Bp, N, S, E, B1, sx_b0, sx_b1, sx_n, sx_c, IDX64, BB, SP, NP, EP)
    xs = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(DOT_DTYPE)  # [R, NP, EP], sources p
    for q0 in range(0, N, QB):
        g = _logits(z, gw_ptr, gb_ptr, q0, N, D, sgw_o, sgw_i, sgb, R, NP, DP, QB, DOT_DTYPE, ACC_DTYPE, PRECISION)
        pt = tl.permute(_column_softmax(g), (0, 2, 1)).to(DOT_DTYPE)  # [R, QB, NP]: P^T
        y = tl.dot(pt, xs, input_precision=PRECISION, out_dtype=ACC_DTYPE)  # [R, QB, EP]
        y_offs, y_mask = _segment_tile(b0, q0, Bp, N, S, E, B1, sy_b0, sy_b1, sy_n, sy_c, IDX64, BB, SP, QB, EP)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=y_mask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mix_input_grad_kernel(
    x_ptr, cw_ptr, cb_ptr, gw_ptr, gb_ptr, dy_ptr, dx_ptr,
    Bp, B1, N, S, E, D,
    sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb, sgw_o, sgw_i, sgb, sdy_b0, sdy_b1, sdy_n, sdy_c, sdx_b0, sdx_b1, sdx_n, sdx_c,
    IDX64: tl.constexpr, BB: tl.constexpr, SP: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr,
    EP: tl.constexpr, QB: tl.constexpr, EB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The mixing's share of x's gradient, dx[b, p, s*E + e] = sum_q P[b, s, p, q] dY[b, q, s*E + e],
    for the BB sequences of program b0 = pid0*BB and the EB channels per segment from
    e0 = pid1*EB (the forward with P for P^T and dY for x). Channel blocks, each recomputing P:
    the whole [BB*SP, NP, EP] accumulator beside the logits spilled on sm_90 at DynaMixer-S
    stage 1 (255 registers, 260 bytes; ptxas).

    x_ptr, cw_ptr, cb_ptr, gw_ptr, gb_ptr: as _mix_forward_kernel
    dy_ptr: [B0, B1, N, C] dY (sdy_*);  dx_ptr: [B0, B1, N, C] dx (sdx_*), written
    """
    R: tl.constexpr = BB * SP
    b0 = tl.program_id(0) * BB
    z = _compressed(x_ptr, cw_ptr, cb_ptr, b0, Bp, N, S, E, D, B1, sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb,
                    IDX64, BB, NP, SP, DP, EP, DOT_DTYPE, ACC_DTYPE, PRECISION)  # fmt: skip
    e0 = tl.program_id(1) * EB
    dxs = tl.zeros([R, NP, EB], dtype=ACC_DTYPE)
    for q0 in range(0, N, QB):
        pm = _column_softmax(_logits(z, gw_ptr, gb_ptr, q0, N, D, sgw_o, sgw_i, sgb, R, NP, DP, QB, DOT_DTYPE,
                                     ACC_DTYPE, PRECISION))  # fmt: skip
        dy_offs, dy_mask = _segment_tile(b0, q0, Bp, N, S, E, B1, sdy_b0, sdy_b1, sdy_n, sdy_c, IDX64, BB, SP, QB, EB, e0)
        dyb = tl.load(dy_ptr + dy_offs, mask=dy_mask, other=0.0).to(DOT_DTYPE)  # [R, QB, EB]
        dxs = tl.dot(pm.to(DOT_DTYPE), dyb, dxs, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    dx_offs, dx_mask = _segment_tile(b0, 0, Bp, N, S, E, B1, sdx_b0, sdx_b1, sdx_n, sdx_c, IDX64, BB, SP, NP, EB, e0)
    tl.store(dx_ptr + dx_offs, dxs.to(dx_ptr.dtype.element_ty), mask=dx_mask)


@triton.jit
def _logit_grad_kernel(
    x_ptr, cw_ptr, cb_ptr, gw_ptr, gb_ptr, dy_ptr, dx_ptr, dr_ptr,
    Bp, B1, N, S, E, D,
    sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb, sgw_o, sgw_i, sgb, sdy_b0, sdy_b1, sdy_n, sdy_c, sdx_b0, sdx_b1, sdx_n, sdx_c,
    sdr_b0, sdr_b1, sdr_n, sdr_f,
    NEED_X: tl.constexpr, IDX64: tl.constexpr, BB: tl.constexpr, SP: tl.constexpr, NP: tl.constexpr,
    DP: tl.constexpr, EP: tl.constexpr, QB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Through the logits, for the BB sequences of program b0 = pid*BB: dG per q-block,
    dz = dG Wg, written as dr (compress's output gradient); when NEED_X, compress's share
    dr Wc added to dx (which holds the mixing's share: _mix_input_grad_kernel ran first).

    x_ptr, cw_ptr, cb_ptr, gw_ptr, gb_ptr: as _mix_forward_kernel
    dy_ptr: [B0, B1, N, C] dY (sdy_*);  dx_ptr: [B0, B1, N, C] dx (sdx_*), read and written (if NEED_X)
    dr_ptr: [B0, B1, N, S*d] in ACC_DTYPE (sdr_b0, sdr_b1, sdr_n, sdr_f), written
    """
    R: tl.constexpr = BB * SP
    b0 = tl.program_id(0) * BB
    z = _compressed(x_ptr, cw_ptr, cb_ptr, b0, Bp, N, S, E, D, B1, sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb,
                    IDX64, BB, NP, SP, DP, EP, DOT_DTYPE, ACC_DTYPE, PRECISION)  # fmt: skip
    x_offs, x_mask = _segment_tile(b0, 0, Bp, N, S, E, B1, sx_b0, sx_b1, sx_n, sx_c, IDX64, BB, SP, NP, EP)
    xs = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(DOT_DTYPE)  # [R, NP, EP]
    dz = tl.zeros([R, NP * DP], dtype=ACC_DTYPE)
    for q0 in range(0, N, QB):
        dg = _logit_grad(z, xs, gw_ptr, gb_ptr, dy_ptr, b0, q0, Bp, N, S, E, D, B1, sgw_o, sgw_i, sgb,
                         sdy_b0, sdy_b1, sdy_n, sdy_c, IDX64, BB, SP, NP, DP, EP, QB, DOT_DTYPE, ACC_DTYPE, PRECISION)
        dg = tl.reshape(dg, [R, NP * QB]).to(DOT_DTYPE)
        w = _generate_block(gw_ptr, q0, N, D, sgw_o, sgw_i, NP, DP, QB).to(DOT_DTYPE)
        dz = tl.dot(dg, tl.trans(w), dz, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    # dz [(b, s), (l, k)] -> dr [(b, l), (s, k)]: compress's layout
    dr = tl.reshape(tl.permute(tl.reshape(dz, [BB, SP, NP, DP]), (0, 2, 1, 3)), [BB * NP, SP * DP])
    f, f_ok = _compress_weight_rows(S, D, SP, DP)
    rows = tl.arange(0, BB * NP)
    b = b0 + rows // NP
    if IDX64:
        b = b.to(tl.int64)
    t = rows % NP
    row_ok = (b < Bp) & (t < N)
    tl.store(dr_ptr + (_sequence_offsets(b, B1, sdr_b0, sdr_b1) + t * sdr_n)[:, None] + (f * sdr_f)[None, :], dr,
             mask=row_ok[:, None] & f_ok[None, :])  # fmt: skip
    if NEED_X:
        dr = dr.to(DOT_DTYPE)
        e = tl.arange(0, EP)
        for seg in range(0, S):  # one segment of dx's channels per step, token-major
            offs, mask = _token_tile(b0, Bp, N, E, B1, sdx_b0, sdx_b1, sdx_n, sdx_c, IDX64, BB, NP, EP, seg)
            w = tl.load(cw_ptr + f[:, None] * scw_o + (seg * E + e)[None, :] * scw_i,
                        mask=f_ok[:, None] & (e < E)[None, :], other=0.0)  # fmt: skip  [SP*DP, EP]
            dxc = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
            dxc = tl.dot(dr, w.to(DOT_DTYPE), dxc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            tl.store(dx_ptr + offs, dxc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _generate_grad_kernel(
    x_ptr, cw_ptr, cb_ptr, gw_ptr, gb_ptr, dy_ptr, part_w_ptr, part_b_ptr,
    Bp, B1, N, S, E, D, TILES, RANGES,
    sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb, sgw_o, sgw_i, sgb, sdy_b0, sdy_b1, sdy_n, sdy_c,
    spw_r, spw_o, spw_i, spb_r, spb_o,
    NEED_W: tl.constexpr, NEED_B: tl.constexpr, IDX64: tl.constexpr, BB: tl.constexpr, SP: tl.constexpr,
    NP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr, QB: tl.constexpr, LB: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """generate's partial gradients over the sequence tiles pid1, pid1 + RANGES, ... (in that
    order): dWg[p*N + q, l*d + k] = sum over rows (b, s) of dG[(b, s), p, q] z[(b, s), l*d + k]
    for the q-block q0 = (pid0 // l-blocks)*QB and l-block l0 = (pid0 % l-blocks)*LB, and
    dbg[p*N + q] = sum dG (written by the l-block 0 programs).

    x_ptr .. gb_ptr, dy_ptr: as _logit_grad_kernel; TILES = cdiv(B', BB)
    part_w_ptr: [RANGES, N*N, N*d] (spw_r, spw_o, spw_i);  part_b_ptr: [RANGES, N*N] (spb_r, spb_o)
    """
    R: tl.constexpr = BB * SP
    l_blocks = tl.cdiv(N, LB)
    q0 = (tl.program_id(0) // l_blocks) * QB
    l0 = (tl.program_id(0) % l_blocks) * LB
    part = tl.program_id(1)
    dwg = tl.zeros([NP * QB, LB * DP], dtype=ACC_DTYPE)
    dbg = tl.zeros([NP * QB], dtype=ACC_DTYPE)
    for tile in range(part, TILES, RANGES):
        b0 = tile * BB
        z = _compressed(x_ptr, cw_ptr, cb_ptr, b0, Bp, N, S, E, D, B1, sx_b0, sx_b1, sx_n, sx_c, scw_o, scw_i, scb,
                        IDX64, BB, NP, SP, DP, EP, DOT_DTYPE, ACC_DTYPE, PRECISION)  # fmt: skip
        x_offs, x_mask = _segment_tile(b0, 0, Bp, N, S, E, B1, sx_b0, sx_b1, sx_n, sx_c, IDX64, BB, SP, NP, EP)
        xs = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(DOT_DTYPE)
        dg = tl.reshape(_logit_grad(z, xs, gw_ptr, gb_ptr, dy_ptr, b0, q0, Bp, N, S, E, D, B1, sgw_o, sgw_i, sgb,
                                    sdy_b0, sdy_b1, sdy_n, sdy_c, IDX64, BB, SP, NP, DP, EP, QB, DOT_DTYPE, ACC_DTYPE,
                                    PRECISION), [R, NP * QB])  # fmt: skip
        if NEED_B:
            if l0 == 0:  # the l-block-0 programs own dbg
                dbg += tl.sum(dg, axis=0)
        if NEED_W:
            if LB == NP:
                zl = z
            else:  # the l-block's columns of z, picked out exactly (a sum with zeros)
                z3 = tl.reshape(z, [R, NP // LB, LB * DP])
                pick = (tl.arange(0, NP // LB) == l0 // LB)[None, :, None]
                zl = tl.sum(tl.where(pick, z3, 0.0), axis=1)
            dwg = tl.dot(tl.trans(dg.to(DOT_DTYPE)), zl.to(DOT_DTYPE), dwg, input_precision=PRECISION,
                         out_dtype=ACC_DTYPE)  # fmt: skip
    j = tl.arange(0, NP * QB)
    o = (j // QB) * N + q0 + j % QB  # generate's output feature p*N + q
    o_ok = (j // QB < N) & (q0 + j % QB < N)
    if NEED_W:
        i = tl.arange(0, LB * DP)
        l = l0 + i // DP
        i_ok = (l < N) & (i % DP < D)
        tl.store(part_w_ptr + part * spw_r + o[:, None] * spw_o + (l * D + i % DP)[None, :] * spw_i, dwg,
                 mask=o_ok[:, None] & i_ok[None, :])  # fmt: skip
    if NEED_B:
        if l0 == 0:
            tl.store(part_b_ptr + part * spb_r + o * spb_o, dbg, mask=o_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def sequences(t: torch.Tensor, axis: str | None) -> torch.Tensor:
    """The [B0, B1, N, C] view of t whose sequences (b0, b1) are mixed, no copy: the public op's
    [B', N, C] (axis None, B1 = 1); along W of [B, H, W, C] (axis "w"), its rows; along H
    (axis "h"), its columns, through the H, W transpose."""
    if axis is None:
        return t.unsqueeze(1)
    return t.transpose(1, 2) if axis == "h" else t


def _geometry(xv, num_head, reduced_dim):
    """(B', B1, N, S, E, d) of the sequence view xv [B0, B1, N, C]."""
    B0, B1, N, C = xv.shape
    return B0 * B1, B1, N, num_head, C // num_head, reduced_dim


def launch_forward(xv, compress_weight, compress_bias, generate_weight, generate_bias, yv, num_head, reduced_dim):
    """yv <- dynamixer_mix of the sequences of xv (sequence views [B0, B1, N, C], any strides):
    one fused launch."""
    Bp, B1, N, S, E, D = _geometry(xv, num_head, reduced_dim)
    t = dynamixer_tiles(N, S, E, D)
    dot_dtype, acc_dtype, precision = dot_dtypes(xv.dtype)
    _mix_forward_kernel[(triton.cdiv(Bp, t.bb),)](
        xv, compress_weight, compress_bias, generate_weight, generate_bias, yv,
        Bp, B1, N, S, E, D,
        *strides(xv), *strides(compress_weight), *strides(compress_bias), *strides(generate_weight),
        *strides(generate_bias), *strides(yv),
        IDX64=needs_idx64(xv, yv), BB=t.bb, SP=t.sp, NP=t.np, DP=t.dp, EP=t.ep, QB=t.qb,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, num_warps=t.num_warps,
    )  # fmt: skip


def axis_forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim, axis):
    """The ``triton`` forward of ``mixops::_dynamixer_axis_mix`` (axis "h" or "w" of x
    [B, H, W, C]) and, with axis None, of ``mixops::dynamixer_mix``: y contiguous, x's shape."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        launch_forward(sequences(x, axis), compress_weight, compress_bias, generate_weight, generate_bias,
                       sequences(y, axis), num_head, reduced_dim)  # fmt: skip
    return y


def forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim):
    """The ``triton`` forward of ``mixops::dynamixer_mix``: contiguous y."""
    return axis_forward(x, compress_weight, compress_bias, generate_weight, generate_bias, num_head, reduced_dim,
                        None)  # fmt: skip


def launch_mix_backward(xv, compress_weight, compress_bias, generate_weight, generate_bias, dyv, dxv, drv, num_head,
                        reduced_dim):  # fmt: skip
    """drv [B0, B1, N, S*d] (accumulator dtype) <- compress's output gradient and, unless dxv is
    None, dxv <- x's gradient: the mixing's share (_mix_input_grad_kernel), then compress's added
    to it (_logit_grad_kernel, which writes dr). Sequence views of any strides, as xv."""
    Bp, B1, N, S, E, D = _geometry(xv, num_head, reduced_dim)
    t = dynamixer_tiles(N, S, E, D)
    dot_dtype, acc_dtype, precision = dot_dtypes(xv.dtype)
    grid = (triton.cdiv(Bp, t.bb),)
    dxp = dxv if dxv is not None else dyv
    common = (
        *strides(xv), *strides(compress_weight), *strides(compress_bias), *strides(generate_weight),
        *strides(generate_bias), *strides(dyv), *strides(dxp),
    )  # fmt: skip
    tiles = dict(IDX64=needs_idx64(xv, dyv, dxp, drv), BB=t.bb, SP=t.sp, NP=t.np, DP=t.dp, EP=t.ep, QB=t.qb,
                 DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, num_warps=t.num_warps)  # fmt: skip
    if dxv is not None:
        _mix_input_grad_kernel[(grid[0], t.ep // t.eb)](
            xv, compress_weight, compress_bias, generate_weight, generate_bias, dyv, dxv, Bp, B1, N, S, E, D,
            *common, EB=t.eb, **tiles,
        )  # fmt: skip
    _logit_grad_kernel[grid](
        xv, compress_weight, compress_bias, generate_weight, generate_bias, dyv, dxp, drv, Bp, B1, N, S, E, D,
        *common, *strides(drv), NEED_X=dxv is not None, **tiles,
    )  # fmt: skip


def _generate_grads(xv, cw, cb, gw, gb, dyv, t, need_w, need_b, geometry):
    """[dWg], [dbg] as asked, in the accumulator dtype: _generate_grad_kernel's fixed ranges,
    then their partials summed in order."""
    Bp, B1, N, S, E, D = geometry
    acc = torch.float64 if xv.dtype == torch.float64 else torch.float32
    tiles = triton.cdiv(Bp, t.bb)
    blocks = triton.cdiv(N, t.qb) * triton.cdiv(N, t.lb)
    ranges = deterministic_split(tiles, 1, blocks)
    # every entry is written: the q-blocks x l-blocks cover dWg, the l-block-0 programs dbg
    pw = torch.empty((ranges, N * N, N * D) if need_w else (1, 1, 1), dtype=acc, device=xv.device)
    pb = torch.empty((ranges, N * N) if need_b else (1, 1), dtype=acc, device=xv.device)
    dot_dtype, acc_dtype, precision = dot_dtypes(xv.dtype)
    _generate_grad_kernel[(blocks, ranges)](
        xv, cw, cb, gw, gb, dyv, pw, pb,
        Bp, B1, N, S, E, D, tiles, ranges,
        *strides(xv), *strides(cw), *strides(cb), *strides(gw), *strides(gb), *strides(dyv),
        *pw.stride(), *pb.stride(),
        NEED_W=need_w, NEED_B=need_b, IDX64=needs_idx64(xv, dyv, pw, pb), BB=t.bb, SP=t.sp, NP=t.np, DP=t.dp,
        EP=t.ep, QB=t.qb, LB=t.lb,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision, num_warps=t.num_warps,
    )  # fmt: skip
    out = []
    if need_w:
        out.append(column_sum(pw.view(1, ranges, -1)).view(N * N, N * D))
    if need_b:
        out.append(column_sum(pb[None]).view(N * N))
    return out


def axis_backward(grads, needs, x, compress_weight, compress_bias, generate_weight, generate_bias, num_head,
                  reduced_dim, axis):  # fmt: skip
    """The ``triton`` backward of ``mixops::_dynamixer_axis_mix`` (axis None: of
    ``mixops::dynamixer_mix``): the fused mixing backward (dx, dr), compress's parameter
    gradients from dr (kernels/_weight_grad.py), generate's from the dWg kernel."""
    need_x, need_cw, need_cb, need_gw, need_gb = needs
    dy = grads[0]
    xv, dyv = sequences(x, axis), sequences(dy, axis)
    geometry = _geometry(xv, num_head, reduced_dim)
    Bp, B1, N, S, E, D = geometry
    params = (compress_weight, compress_bias, generate_weight, generate_bias)
    if Bp == 0:
        return [torch.zeros_like(t) for t, n in zip((x, *params), needs) if n]
    t = dynamixer_tiles(N, S, E, D)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = []
    if need_x or need_cw or need_cb:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        # dr in x's token order, so that compress's weight gradient pairs rows of two plain views
        dr = torch.empty((*x.shape[:-1], S * D), dtype=acc, device=x.device)
        launch_mix_backward(xv, *params, dyv, None if dx is None else sequences(dx, axis), sequences(dr, axis),
                            num_head, reduced_dim)  # fmt: skip
        if need_x:
            out.append(dx)
        if need_cw or need_cb:
            rows = (x.shape[0], -1)
            out += [g.to(x.dtype) for g in linear_param_grads(dr.reshape(*rows, S * D), x.reshape(*rows, E * S),
                                                              need_cw, need_cb)]  # fmt: skip
    if need_gw or need_gb:
        out += [g.to(x.dtype) for g in _generate_grads(xv, *params, dyv, t, need_gw, need_gb, geometry)]
    return out


def backward(grads, needs, x, compress_weight, compress_bias, generate_weight, generate_bias, num_head,
             reduced_dim):  # fmt: skip
    """The ``triton`` backward of ``mixops::dynamixer_mix``."""
    return axis_backward(grads, needs, x, compress_weight, compress_bias, generate_weight, generate_bias, num_head,
                         reduced_dim, None)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The block's pass 2 (mixops::_dynamixer_reweighted): kernels/_reweighted_mix.py
# ---------------------------------------------------------------------------------------------


def reweighted_forward(mixed_h, mixed_w, x, weight_h, weight_w, weight_c, bias_h, bias_w, bias_c, alpha):
    """The ``triton`` forward of ``mixops::_dynamixer_reweighted``: one K = 3C GEMM over the
    maps as they lie, the biases and softmax weights applied in its epilogue."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch_mix((mixed_h, mixed_w, x), None, (weight_h, weight_w, weight_c), (bias_h, bias_w, bias_c), alpha, out)
    return out


def reweighted_backward(grads, needs, mixed_h, mixed_w, x, weight_h, weight_w, weight_c, bias_h, bias_w, bias_c,
                        alpha):  # fmt: skip
    """The ``triton`` backward of ``mixops::_dynamixer_reweighted``: per branch, the map's
    gradient (a_k·dY) @ W_k and the weight, bias and alpha gradients
    (_reweighted_mix.branch_backward, deterministic), in the schema's input order."""
    g = grads[0]
    need_maps, need_weights, need_biases, need_alpha = needs[0:3], needs[3:6], needs[6:9], needs[9]
    maps, weights, biases = (mixed_h, mixed_w, x), (weight_h, weight_w, weight_c), (bias_h, bias_w, bias_c)
    gsum = token_sums(g) if any(need_biases) or need_alpha else None
    per_branch = [
        branch_backward(g, gsum, alpha, k, lambda k=k: maps[k], weights[k], biases[k], need_maps[k], need_weights[k],
                        need_biases[k], need_alpha)
        for k in range(3)
    ]  # fmt: skip
    out = [grad for part in range(3) for grad in (branch[part] for branch in per_branch) if grad is not None]
    if need_alpha:
        out.append(torch.stack([branch[3] for branch in per_branch], dim=2).to(alpha.dtype))
    return out
