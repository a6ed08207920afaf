"""Triton backend of ``mixops.atm_sample`` (ActiveMLP's per-channel 1-D zero-padded lerp gather)
and ``mixops.atm_fc`` (that gather fused into the following FC GEMM, the official ATMOp).

What it computes (``docs/atm.md`` sections 3-4), on channels-last ``x [B,H,W,C]``
with compact offsets ``off [B,H,W,G]``, ``G = C / S`` (channel c uses offset ``c // S``):

    axis "w": out[b,i,j,c] = lerp0(x[b,i,:,c], j + off[b,i,j,c//S])     (same row)
    axis "h": out[b,i,j,c] = lerp0(x[b,:,j,c], i + off[b,i,j,c//S])     (same column)
    lerp0(v, p) = (1-f)·V(k) + f·V(k+1),  k = floor(p), f = p - k,  V(t) = v[t] inside, else 0

Both axes are one kernel: a *line* is a row (axis "w") or a column (axis "h") of one image; the
kernels see ``[B, L lines, n positions, C]`` through strides. Positions and weights are fp32
(fp64 for fp64 inputs) whatever the storage dtype; p <= -1 and p >= n give exact zeros and an
exact integer p returns x[p] exactly.

Backward (deterministic, no atomics; docs/atm.md section 12.6 option 1, "owner computes"): one program owns one
line and a block of channel groups. It walks the line's positions in a fixed order and

- writes gOff[q, grp] = sum over the S channels of the group of g·(V(k+1) - V(k)) (the
  right-hand slope at integers, x[0] at p = -1, 0 for p < -1 and p >= n), summed in registers;
- then pulls gX block by block of targets (docs/atm.md section 12.6 option 2 with a run-time bound): a sample
  at q adds g·(1-f) to target k and g·f to target k+1 (in-range targets only). The first
  walk also records, per block of targets, the range of shifts q - t of the samples that reach
  it (target_block_shifts), so each target block visits only those shifts, in increasing order:
  a sample far off the line reaches nothing and widens no range, a far in-range one widens only
  the ranges of its own two targets' blocks, and no range exceeds the line.
  Every contribution stays inside its own line, so no other program writes the same gX
  element, and gX is stored once.

Cost, N = B·H·W·C elements, element size e bytes:
- forward: ~8 FLOP per element (position, floor, lerp); minimal HBM traffic (2 + 1/S)·N·e
  (read x once, read the compact offsets, write out; the two lerp corners of a line are re-read
  from L1/L2, not HBM). Memory-bound.
- backward: ~6 FLOP per element for the lerp weights and slope, plus ~10 per shift of the gX
  pull (~2·max|offset| + 3 shifts per target block for the offsets that reach it: ~10 for
  N(0, 1) offsets, n + BLOCK_Q - 1 at worst; the re-read g and offsets come from L1); minimal
  HBM traffic (3 + 2/S)·N·e (read g, x, offsets; write gX, gOff).

atm_fc (docs/atm.md sections 6, 12.5): out[m, n] = sum_c S[m, c]·W[n, c] + bias[n] over the M = B·H·W pixels,
S = the gather above. The gather is the GEMM's A-load stage: each A tile (pixels x input
channels) is lerped in registers from x and the offsets (lerp_gather, shared with the
atm_sample kernels and kernels/atm_layer.py), so S never reaches HBM. Backward is
deterministic and reuses the atm_sample kernels: dS = g @ W (torch matmul), then the
owner-computes backward turns dS into gX and gOff; dW = g^T @ S with S recomputed by the
atm_sample forward (a transient); db = g summed over the pixels by _common.column_sum (split
by shape only: the same bits on every GPU).
- forward: 2·M·C·C_out FLOP (+ ~8 per gathered element and column block); minimal HBM traffic
  (M·C·(1 + 1/S) + C·C_out + M·C_out)·e (read x, offsets, W once; write out) against
  (M·C·(3 + 1/S) + ...)·e for gather then GEMM.
- backward: 4·M·C·C_out FLOP (dS, dW) plus the gather backward; dS and S are transients of
  M·C elements each.

Grids:
- forward:  (cdiv(B·L·n, BLOCK_M), cdiv(C, BLOCK_C)) -- tiles of pixels x channels, lanes over
  channels so NHWC loads and stores coalesce.
- backward: (B·L, cdiv(G, BLOCK_G)) -- one program per (line, block of channel groups).
- atm_fc forward: (cdiv(M, BLOCK_M) · cdiv(C_out, BLOCK_N),) -- the column blocks of one row
  block are adjacent, so each x gather is re-read from L2 rather than HBM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Blocks,
    column_sum,
    compute_dtype,
    dot_dtypes,
    interpreter_gemm_blocks,
    interpreting,
    needs_idx64,
    output_tile,
    pow2_between,
    pow2_floor,
    strides,
)

__all__ = [
    "BackwardBlocks",
    "GatherBlocks",
    "backward",
    "backward_blocks",
    "channel_tile",
    "fc_backward",
    "fc_blocks",
    "fc_forward",
    "forward",
    "forward_blocks",
    "gather_gemm",
    "launch_backward",
    "launch_fc_forward",
    "launch_forward",
    "lerp_gather",
    "sample_position",
    "target_block_shifts",
]

_AXIS_DIMS = {"w": (1, 2), "h": (2, 1)}  # (line dim, position dim) of [B,H,W,C] per axis


# ---------------------------------------------------------------------------------------------
# Jit helpers shared by the ATM kernels (here and kernels/atm_layer.py)
# ---------------------------------------------------------------------------------------------


@triton.jit
def sample_position(pos, N):
    """(k, f) of sample positions ``pos`` on a line of N: k = floor(pos) as int32, f = pos - k.

    Outside [-2, n] both corners are out of range whatever the clamp does, and the clamp keeps
    the integer conversion defined for huge offsets.
    """
    pos = tl.minimum(tl.maximum(pos, -2.0), N * 1.0)
    kf = tl.floor(pos)
    return kf.to(tl.int32), pos - kf


@triton.jit
def _corner_values(x_ptr, x_idx, k, N, sx_p, mask, COMPUTE: tl.constexpr, IDX64: tl.constexpr):
    """(V(k), V(k+1)) in COMPUTE: x[x_idx + k·sx_p] and x[x_idx + (k+1)·sx_p] where the corner
    is in [0, N) and ``mask`` holds, else 0 (zero padding). ``x_idx`` (int64 when IDX64, else
    int32) is the element offset of position 0 of the line, broadcastable to k."""
    if IDX64:
        k = k.to(tl.int64)
    in0 = mask & (k >= 0) & (k < N)
    in1 = mask & (k + 1 >= 0) & (k + 1 < N)
    v0 = tl.load(x_ptr + (x_idx + k * sx_p), mask=in0, other=0.0).to(COMPUTE)
    v1 = tl.load(x_ptr + (x_idx + (k + 1) * sx_p), mask=in1, other=0.0).to(COMPUTE)
    return v0, v1


@triton.jit
def lerp_gather(x_ptr, x_row, off_ptr, o_row, q, c0, C, N, sx_p, sx_c, so_g, m_ok, SHARE: tl.constexpr,
                GROUPED: tl.constexpr, COMPUTE: tl.constexpr, IDX64: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """[BLOCK_M, BLOCK_C] tile of lerp0 in COMPUTE: pixel i's line at q[i] + off[c // SHARE],
    for the channels c = c0 + [0, BLOCK_C) (c0 a multiple of BLOCK_C); masked pixels and
    channels >= C are 0. The A-load stage of every ATM GEMM and the gather of atm_sample.

    x_row [BLOCK_M] element offsets into x_ptr of channel 0 at position 0 of each pixel's line
    (position stride sx_p, channel stride sx_c); o_row [BLOCK_M] element offsets into off_ptr
    of each pixel's offset group 0 (group stride so_g); both int64 when IDX64, else int32 (the
    launcher's needs_idx64), which keeps the per-element index math in 32-bit registers;
    q [BLOCK_M] the pixels' own positions; m_ok [BLOCK_M] the valid pixels.

    With GROUPED and a power-of-2 SHARE the tile is worked as [BLOCK_M, GROUPS, LANES] (LANES = one group's
    channels in the tile): the offsets, positions and weights exist once per group, and each
    corner is a run of LANES channels at one position, which the compiler turns into vector
    loads when sx_c is the constant 1. Otherwise a 2-D tile re-reads each group's offset per
    channel, from L1: the path of non-power-of-2 shares, and of strided channels, where the
    3-D tile's scalar 64-bit corner addresses spill on sm_90.
    """
    if GROUPED and (SHARE & (SHARE - 1)) == 0:
        LANES: tl.constexpr = SHARE if SHARE < BLOCK_C else BLOCK_C
        GROUPS: tl.constexpr = BLOCK_C // LANES
        # the tile's groups: GROUPS consecutive ones, or the one group holding it (GROUPS = 1)
        grp = c0 // SHARE + tl.arange(0, GROUPS)
        o = tl.load(off_ptr + (o_row[:, None] + grp[None, :] * so_g),
                    mask=m_ok[:, None] & (grp < C // SHARE)[None, :], other=0.0).to(COMPUTE)
        k, f = sample_position(q.to(COMPUTE)[:, None] + o, N)
        c = c0 + (tl.arange(0, GROUPS) * LANES)[:, None] + tl.arange(0, LANES)[None, :]  # [GROUPS, LANES]
        mask = m_ok[:, None, None] & (c < C)[None, :, :]
        x_run = x_row[:, None, None] + c[None, :, :] * sx_c
        v0, v1 = _corner_values(x_ptr, x_run, k[:, :, None], N, sx_p, mask, COMPUTE, IDX64)
        f = f[:, :, None]
        out = tl.reshape((1.0 - f) * v0 + f * v1, [BLOCK_M, BLOCK_C])
    else:
        c = c0 + tl.arange(0, BLOCK_C)
        mask = m_ok[:, None] & (c < C)[None, :]
        o = tl.load(off_ptr + (o_row[:, None] + (c // SHARE)[None, :] * so_g), mask=mask, other=0.0).to(COMPUTE)
        k, f = sample_position(q.to(COMPUTE)[:, None] + o, N)
        v0, v1 = _corner_values(x_ptr, x_row[:, None] + c[None, :] * sx_c, k, N, sx_p, mask, COMPUTE, IDX64)
        out = (1.0 - f) * v0 + f * v1
    return out


@triton.jit
def gather_gemm(acc, x_ptr, x_row, off_ptr, o_row, q, N, sx_p, sx_c, so_g, m_ok, w_ptr, n, n_ok, sw_n, sw_k, C,
                SHARE: tl.constexpr, GATHER: tl.constexpr, COMPUTE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                PRECISION: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + S·W^T, the K loop of every ATM GEMM: S [BLOCK_M, C] the lerp gather of the pixels
    that lerp_gather's x_row, o_row, q, m_ok describe (lines of N positions), formed BLOCK_K
    channels at a time in the A-load stage -- or, unless GATHER, x itself at each pixel's own
    position q (ATMLayer's channel branch; off_ptr, o_row, so_g, SHARE unused), loaded in the
    storage dtype straight into the dot. W [C_OUT, C] at n·sw_n + c·sw_k for the output
    channels n (valid where n_ok). DOT_DTYPE / PRECISION: the tl.dot operand type and precision
    (_common.dot_dtypes); acc [BLOCK_M, len(n)] in COMPUTE."""
    for k0 in range(0, C, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        if GATHER:
            a = lerp_gather(x_ptr, x_row, off_ptr, o_row, q, k0, C, N, sx_p, sx_c, so_g, m_ok, SHARE, True, COMPUTE,
                            IDX64, BLOCK_M, BLOCK_K)
        else:
            a = tl.load(x_ptr + ((x_row + q * sx_p)[:, None] + c[None, :] * sx_c),
                        mask=m_ok[:, None] & (c < C)[None, :], other=0.0)
        w = tl.load(w_ptr + (n[None, :] * sw_n + c[:, None] * sw_k), mask=(c < C)[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=COMPUTE)
    return acc


@triton.jit
def target_block_shifts(lo, hi, k, q, valid, N, BLOCK_Q: tl.constexpr, TARGET_BLOCKS: tl.constexpr):
    """Widen the per-target-block shift ranges [lo[j], hi[j]] ([TARGET_BLOCKS] int32; block j
    holds the targets [j·BLOCK_Q, (j+1)·BLOCK_Q)) by the samples of a tile: the sample at
    source q (broadcastable to k) with floor position k reaches the in-range targets among k
    and k + 1, at shifts q - t. Samples where ``valid`` is false, or with no in-range target,
    change nothing. Only the blocks the tile reaches are visited. An empty range has lo > hi.

    Conservative by at most one shift: both targets' blocks get the sample's whole range."""
    t_lo = tl.maximum(k, 0)
    t_hi = tl.minimum(k + 1, N - 1)
    reach = valid & (t_lo <= t_hi)
    d_lo = q - t_hi
    d_hi = q - t_lo
    j_lo = t_lo // BLOCK_Q
    j_hi = t_hi // BLOCK_Q
    first = tl.min(tl.min(tl.where(reach, j_lo, TARGET_BLOCKS), axis=1), axis=0)
    last = tl.max(tl.max(tl.where(reach, j_hi, -1), axis=1), axis=0)
    blocks = tl.arange(0, TARGET_BLOCKS)
    for j in range(first, last + 1):
        touch = reach & ((j_lo == j) | (j_hi == j))
        lo_j = tl.min(tl.min(tl.where(touch, d_lo, N), axis=1), axis=0)
        hi_j = tl.max(tl.max(tl.where(touch, d_hi, -N), axis=1), axis=0)
        lo = tl.where(blocks == j, tl.minimum(lo, lo_j), lo)
        hi = tl.where(blocks == j, tl.maximum(hi, hi_j), hi)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _atm_sample_fwd_kernel(
    x_ptr, off_ptr, out_ptr,
    M, L, N, C,
    sx_b, sx_l, sx_p, sx_c,
    so_b, so_l, so_p, so_g,
    sy_b, sy_l, sy_p, sy_c,
    SHARE: tl.constexpr,
    UNIT_C: tl.constexpr,
    COMPUTE: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b,l,q,c] = lerp0(x[b,l,:,c], q + off[b,l,q,c // SHARE]).

    x_ptr   [B, L, N, C] (any float dtype), strides sx_b (batch), sx_l (line), sx_p (position
            along the line), sx_c (channel).
    off_ptr [B, L, N, C // SHARE] (x's dtype), strides so_b, so_l, so_p, so_g (offset group).
    out_ptr [B, L, N, C] (x's dtype), strides sy_b, sy_l, sy_p, sy_c.
    M = B·L·N pixels; L lines per image; N positions per line; C channels.
    UNIT_C: sx_c == so_g == sy_c == 1 (checked by the launcher). The channel runs of x, the
    offsets and out are then contiguous: the strides become the constant 1 and the gather
    works per offset group (lerp_gather), so the compiler vectorises the corner loads, the
    offset loads and the stores across channels.
    COMPUTE: tl.float32, or tl.float64 for fp64 inputs (positions, weights, lerp).
    IDX64: pixel and element offsets in int64 (some tensor reaches 2^30 elements), else int32.
    """
    if UNIT_C:
        sx_c = 1
        so_g = 1
        sy_c = 1
    pid_c = tl.program_id(1)
    if IDX64:
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = pid_c * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    m_ok = m < M
    q = m % N
    line = m // N
    b = line // L
    l = line % L

    o_row = b * so_b + l * so_l + q * so_p
    x_row = b * sx_b + l * sx_l
    out = lerp_gather(x_ptr, x_row, off_ptr, o_row, q, c0, C, N, sx_p, sx_c, so_g, m_ok, SHARE, UNIT_C, COMPUTE,
                      IDX64, BLOCK_M, BLOCK_C)

    y_ptrs = out_ptr + ((b * sy_b + l * sy_l + q * sy_p)[:, None] + c[None, :] * sy_c)
    tl.store(y_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (c < C)[None, :])


@triton.jit
def _atm_sample_bwd_kernel(
    g_ptr, x_ptr, off_ptr, gx_ptr, goff_ptr,
    L, N, C, G,
    sg_b, sg_l, sg_p, sg_c,
    sx_b, sx_l, sx_p, sx_c,
    so_b, so_l, so_p, so_g,
    sgx_b, sgx_l, sgx_p, sgx_c,
    sgo_b, sgo_l, sgo_p, sgo_g,
    SHARE: tl.constexpr,
    SHARE_P: tl.constexpr,
    COMPUTE: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GOFF: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_G: tl.constexpr,
    TARGET_BLOCKS: tl.constexpr,
):
    """gX and gOff of one line (row or column) for BLOCK_G offset groups, without atomics.

    g_ptr    [B, L, N, C] incoming gradient (any strides, zero strides included): sg_b, sg_l,
             sg_p, sg_c (batch, line, position, channel).
    x_ptr    [B, L, N, C] input: sx_b, sx_l, sx_p, sx_c.
    off_ptr  [B, L, N, G] compact offsets, G = C / SHARE: so_b, so_l, so_p, so_g.
    gx_ptr   [B, L, N, C] gradient of x (written when NEED_GX): sgx_b, sgx_l, sgx_p, sgx_c.
    goff_ptr [B, L, N, G] gradient of the offsets (written when NEED_GOFF): sgo_b, sgo_l,
             sgo_p, sgo_g.
    Program (line = b·L + l, channel-group block). Channel lanes are BLOCK_G groups of SHARE_P
    (SHARE rounded up to a power of 2) lanes, lane s of group grp being channel grp·SHARE + s,
    so a group's channels sit in one row of a [BLOCK_G, SHARE_P] view and its offset gradient
    is a register sum over that row, in a fixed order.
    BLOCK_Q: positions (pass 1) or targets (pass 2) per step along the line; TARGET_BLOCKS: a
    power of 2 >= cdiv(N, BLOCK_Q), the size of the per-target-block shift ranges.

    Pass 1 walks the positions: gOff, and per block of targets the range of shifts q - t of the
    samples that reach it (target_block_shifts, from the same floor positions pass 2 uses).
    Pass 2 pulls gX per block of targets t, visiting only its shifts, in increasing order
    (deterministic); a block no sample reaches is stored as zeros without a walk.
    """
    BLOCK_C: tl.constexpr = BLOCK_G * SHARE_P
    pid_line = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid_line // L).to(tl.int64)
    l = (pid_line % L).to(tl.int64)

    lane = tl.arange(0, BLOCK_C)
    s = lane % SHARE_P
    grp = pid_c * BLOCK_G + lane // SHARE_P
    c = grp * SHARE + s
    c_ok = (s < SHARE) & (grp < G)
    c64 = c.to(tl.int64)[None, :]
    grp64 = grp.to(tl.int64)[None, :]
    grp_out = pid_c * BLOCK_G + tl.arange(0, BLOCK_G)

    g_line = g_ptr + b * sg_b + l * sg_l
    x_line = x_ptr + b * sx_b + l * sx_l
    o_line = off_ptr + b * so_b + l * so_l

    # per target block: the smallest and largest shift q - t that reaches it (empty: lo > hi)
    lo = tl.full([TARGET_BLOCKS], N, tl.int32)
    hi = tl.full([TARGET_BLOCKS], -N, tl.int32)
    for q0 in range(0, N, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = q < N
        mask = q_ok[:, None] & c_ok[None, :]
        q64 = q.to(tl.int64)[:, None]
        o = tl.load(o_line + q64 * so_p + grp64 * so_g, mask=mask, other=0.0).to(COMPUTE)
        k, f = sample_position(q.to(COMPUTE)[:, None] + o, N)
        if NEED_GOFF:
            gv = tl.load(g_line + q64 * sg_p + c64 * sg_c, mask=mask, other=0.0).to(COMPUTE)
            v0, v1 = _corner_values(x_line, c64 * sx_c, k, N, sx_p, mask, COMPUTE, True)
            slope = tl.where(mask, gv * (v1 - v0), 0.0)
            gsum = tl.sum(tl.reshape(slope, [BLOCK_Q, BLOCK_G, SHARE_P]), axis=2)
            go_ptrs = goff_ptr + b * sgo_b + l * sgo_l + q64 * sgo_p + grp_out.to(tl.int64)[None, :] * sgo_g
            tl.store(go_ptrs, gsum.to(goff_ptr.dtype.element_ty), mask=q_ok[:, None] & (grp_out < G)[None, :])
        if NEED_GX:
            lo, hi = target_block_shifts(lo, hi, k, q[:, None], mask, N, BLOCK_Q, TARGET_BLOCKS)

    if NEED_GX:
        blocks = tl.arange(0, TARGET_BLOCKS)
        for t0 in range(0, N, BLOCK_Q):
            t = t0 + tl.arange(0, BLOCK_Q)
            here = blocks == t0 // BLOCK_Q
            d_first = tl.min(tl.where(here, lo, N), axis=0)
            d_last = tl.max(tl.where(here, hi, -N), axis=0)
            acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=COMPUTE)
            for dq in range(d_first, d_last + 1):
                q = t + dq
                mask = ((q >= 0) & (q < N))[:, None] & c_ok[None, :]
                q64 = q.to(tl.int64)[:, None]
                gv = tl.load(g_line + q64 * sg_p + c64 * sg_c, mask=mask, other=0.0).to(COMPUTE)
                o = tl.load(o_line + q64 * so_p + grp64 * so_g, mask=mask, other=0.0).to(COMPUTE)
                k, f = sample_position(q.to(COMPUTE)[:, None] + o, N)
                # target t receives g·(1-f) when t == k and g·f when t == k+1. The select
                # happens after the multiply, so an inf in g reaches only its two targets.
                kt = t[:, None] - k
                acc += tl.where(kt == 0, (1.0 - f) * gv, tl.where(kt == 1, f * gv, 0.0))
            gx_ptrs = gx_ptr + b * sgx_b + l * sgx_l + t.to(tl.int64)[:, None] * sgx_p + c64 * sgx_c
            tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=(t < N)[:, None] & c_ok[None, :])


@triton.jit
def _atm_fc_fwd_kernel(
    x_ptr, off_ptr, w_ptr, bias_ptr, out_ptr,
    M, L, N, C, C_OUT,
    sx_b, sx_l, sx_p, sx_c,
    so_b, so_l, so_p, so_g,
    sw_n, sw_k, s_bias,
    sy_b, sy_l, sy_p, sy_c,
    SHARE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b,l,q,n] = sum_c S[b,l,q,c]·W[n,c] (+ bias[n]), S = atm_sample(x, off) formed in
    registers in the A-load stage of the GEMM (never stored).

    x_ptr    [B, L, N, C] input: sx_b, sx_l, sx_p, sx_c (batch, line, position, channel).
    off_ptr  [B, L, N, C // SHARE] compact offsets: so_b, so_l, so_p, so_g (offset group).
    w_ptr    [C_OUT, C] FC weight: W[n, c] at n·sw_n + c·sw_k.
    bias_ptr [C_OUT] bias, stride s_bias (never read unless HAS_BIAS).
    out_ptr  [B, L, N, C_OUT] output: sy_b, sy_l, sy_p, sy_c.
    M = B·L·N GEMM rows (pixels), C the reduction, C_OUT the GEMM columns.
    COMPUTE: positions, lerp weights and the accumulator (fp32; fp64 for fp64 inputs).
    DOT_DTYPE: what the sampled tile and W enter tl.dot as (storage dtype for fp16/bf16 on the
    GPU, fp32 under the interpreter, whose bf16 dot is wrong); PRECISION: "ieee" or "tf32".
    IDX64: pixel and element offsets in int64 (some tensor reaches 2^30 elements), else int32.
    Program pid: output_tile's row block x column block (a row block's column blocks adjacent).
    The A tile is gathered once per column block, so fc_blocks makes BLOCK_N as wide as the
    registers allow.
    """
    tl.static_assert(BLOCK_K >= 16)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    _, _, m, n, m_ok, n_ok = output_tile(M, C_OUT, BLOCK_M, BLOCK_N, IDX64)
    q = m % N
    line = m // N
    b = line // L
    l = line % L
    x_row = b * sx_b + l * sx_l
    o_row = b * so_b + l * so_l + q * so_p

    acc = gather_gemm(tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE), x_ptr, x_row, off_ptr, o_row, q, N, sx_p, sx_c,
                      so_g, m_ok, w_ptr, n, n_ok, sw_n, sw_k, C, SHARE, True, COMPUTE, DOT_DTYPE, PRECISION, IDX64,
                      BLOCK_M, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + n * s_bias, mask=n_ok, other=0.0)
        acc += bias.to(COMPUTE)[None, :]
    y_ptrs = out_ptr + ((b * sy_b + l * sy_l + q * sy_p)[:, None] + n[None, :] * sy_c)
    tl.store(y_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Block-size heuristics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatherBlocks:
    """Tile of a pixels x channels gather launch: m pixels x c channels per program."""

    m: int
    c: int
    num_warps: int


@dataclass(frozen=True)
class BackwardBlocks:
    """Blocks of the owner-computes backward: g offset groups of share_p lanes per program, q
    positions per step along the line, target_blocks = the power of 2 >= cdiv(n, q) that holds
    the per-target-block shift ranges."""

    share_p: int
    q: int
    g: int
    target_blocks: int
    num_warps: int


def channel_tile(channels: int, cap: int) -> int:
    """The largest power-of-2 channel tile <= cap that divides ``channels`` when one >= 16
    does (C = 320 -> 64: no half-empty last tile), else the next power of 2 up to cap."""
    for t in (cap, cap // 2, cap // 4):
        if t >= 16 and channels % t == 0:
            return t
    return min(triton.next_power_of_2(channels), cap)


def forward_blocks(pixels: int, channels: int) -> GatherBlocks:
    """Tile of the forward. On a GPU: up to 128 channel lanes (a bf16 pixel row of C = 64 is
    one 128-byte transaction), dividing C when it can, and ~2K elements per program. Under the
    interpreter (~1 ms per program, whatever its size): tiles of up to 16K elements, so the
    test shapes take one or a few programs."""
    block_c = channel_tile(channels, 128)
    budget = 16384 if interpreting() else 2048
    block_m = max(1, min(triton.next_power_of_2(pixels), budget // block_c))
    return GatherBlocks(m=block_m, c=block_c, num_warps=4)


def backward_blocks(n: int, channels: int, share: int) -> BackwardBlocks:
    """Blocks of the owner-computes backward for lines of ``n`` positions.

    Each step holds a q x (g · share_p) tile of gradients, offsets and the gX accumulator. On a
    GPU: up to 64 channel lanes (never fewer than one share group) and <= 1024 values per step
    (8 per thread at 4 warps). Under the interpreter (~1 ms per step whatever its size): whole
    lines in one step and up to 64 channels, so the test shapes need one program per line.
    """
    n_pad = triton.next_power_of_2(n)
    share_p = triton.next_power_of_2(share)
    block_c = max(share_p, min(triton.next_power_of_2(channels), 64))
    block_g = min(block_c // share_p, triton.next_power_of_2(channels // share))
    budget = 1 << 16 if interpreting() else 1024
    block_q = pow2_floor(max(1, min(n_pad, budget // (block_g * share_p))))
    target_blocks = triton.next_power_of_2(triton.cdiv(n, block_q))
    return BackwardBlocks(share_p=share_p, q=block_q, g=block_g, target_blocks=target_blocks, num_warps=4)


def fc_blocks(pixels: int, channels: int, c_out: int, dtype: torch.dtype, unit_channels: bool = True) -> Blocks:
    """Tiles of the fused gather-GEMM: m pixels x n output channels, k input channels per step.

    Each column block gathers its A tiles again, so n is as wide as the registers allow: one
    column block (one gather per row block) up to C_out = 512 in fp16/bf16, two at most for
    ActiveMLP's C_out <= 512 in fp32. ptxas for sm_90a, 64-row tiles at ActiveMLP's stage
    shapes, without spills (tests/test_atm_triton.py builds them): fp16/bf16 n <= 128 with 8
    warps (72-93 registers), n = 256 with 8 warps and k = 16 (128 registers: 2 CTAs per SM),
    n = 512 with 16 warps (124 registers, 16 warps per SM); fp32 (an FMA dot in IEEE) n <= 128
    with 8 warps, n = 256 with 16 warps (<= 128 registers); fp64 (gradcheck only) 64 x 32 with
    4 warps. Strided channels (``unit_channels`` false: x's channel stride is not 1) address
    every corner element on its own, so their half-type column tiles stop at 128 (n = 512
    spills 2.3 KB). Under the interpreter: the tiles every GEMM takes there
    (interpreter_gemm_blocks)."""
    if interpreting():
        return interpreter_gemm_blocks(pixels, c_out, channels)
    if dtype == torch.float64:
        return Blocks(m=64, n=32, k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        n = pow2_between(c_out, 64, 256)
        return Blocks(m=64, n=n, k=16, num_warps=16 if n == 256 else 8, num_stages=1)
    n = pow2_between(c_out, 64, 512 if unit_channels else 128)
    if n == 512:
        return Blocks(m=64, n=n, k=32, num_warps=16, num_stages=2)
    if n == 256:
        return Blocks(m=64, n=n, k=16, num_warps=8, num_stages=1)
    return Blocks(m=64, n=n, k=32, num_warps=8, num_stages=2)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _line_strides(t: torch.Tensor, axis: str) -> tuple[int, int, int, int]:
    """(batch, line, position, channel) strides of a [B,H,W,C] tensor for ``axis`` (those of
    size-1 dimensions zeroed, as _common.strides)."""
    line_dim, pos_dim = _AXIS_DIMS[axis]
    s = strides(t)
    return s[0], s[line_dim], s[pos_dim], s[3]


def _line_shape(x: torch.Tensor, axis: str) -> tuple[int, int, int, int]:
    """(B, L, n, C): batch, lines per image, positions per line, channels."""
    line_dim, pos_dim = _AXIS_DIMS[axis]
    return x.shape[0], x.shape[line_dim], x.shape[pos_dim], x.shape[3]


def launch_forward(x: torch.Tensor, offset: torch.Tensor, out: torch.Tensor, axis: str, share: int) -> None:
    """Write ``atm_sample(x, offset)`` into ``out`` (``[B,H,W,C]``, any strides)."""
    B, L, n, C = _line_shape(x, axis)
    M = B * L * n
    if M == 0 or C == 0:
        return
    blocks = forward_blocks(M, C)
    xs, os_, ys = _line_strides(x, axis), _line_strides(offset, axis), _line_strides(out, axis)
    grid = (triton.cdiv(M, blocks.m), triton.cdiv(C, blocks.c))
    _atm_sample_fwd_kernel[grid](
        x, offset, out,
        M, L, n, C,
        *xs, *os_, *ys,
        SHARE=share,
        UNIT_C=xs[3] == 1 and os_[3] == 1 and ys[3] == 1,
        COMPUTE=compute_dtype(x.dtype),
        IDX64=needs_idx64(x, offset, out),
        BLOCK_M=blocks.m,
        BLOCK_C=blocks.c,
        num_warps=blocks.num_warps,
    )


def launch_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    grad_x: torch.Tensor | None,
    grad_offset: torch.Tensor | None,
    axis: str,
    share: int,
) -> None:
    """Write the gradients of ``atm_sample`` w.r.t. x into ``grad_x`` and w.r.t. the compact
    offsets into ``grad_offset`` (either may be None: not computed). Any strides."""
    if grad_x is None and grad_offset is None:
        return
    B, L, n, C = _line_shape(x, axis)
    G = C // share
    if B * L * n == 0 or C == 0:
        return
    blocks = backward_blocks(n, C, share)
    # an unused output pointer is never touched (its branch is compiled out): pass any tensor
    gx = grad_x if grad_x is not None else x
    go = grad_offset if grad_offset is not None else offset
    grid = (B * L, triton.cdiv(G, blocks.g))
    _atm_sample_bwd_kernel[grid](
        grad, x, offset, gx, go,
        L, n, C, G,
        *_line_strides(grad, axis),
        *_line_strides(x, axis),
        *_line_strides(offset, axis),
        *_line_strides(gx, axis),
        *_line_strides(go, axis),
        SHARE=share,
        SHARE_P=blocks.share_p,
        COMPUTE=compute_dtype(x.dtype),
        NEED_GX=grad_x is not None,
        NEED_GOFF=grad_offset is not None,
        BLOCK_Q=blocks.q,
        BLOCK_G=blocks.g,
        TARGET_BLOCKS=blocks.target_blocks,
        num_warps=blocks.num_warps,
    )


def launch_fc_forward(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    axis: str,
    share: int,
) -> None:
    """Write ``atm_sample(x, offset) @ weight.T (+ bias)`` into ``out`` (``[B,H,W,C_out]``, any
    strides; must not overlap itself). ``weight [C_out, C]`` and ``bias [C_out]``: any strides."""
    B, L, n, C = _line_shape(x, axis)
    M = B * L * n
    c_out = weight.shape[0]
    if M == 0 or c_out == 0:
        return
    blocks = fc_blocks(M, C, c_out, x.dtype, unit_channels=x.stride(3) == 1)
    dot_dtype, _, precision = dot_dtypes(x.dtype)
    grid = (triton.cdiv(M, blocks.m) * triton.cdiv(c_out, blocks.n),)
    _atm_fc_fwd_kernel[grid](
        x, offset, weight, bias if bias is not None else weight, out,
        M, L, n, C, c_out,
        *_line_strides(x, axis),
        *_line_strides(offset, axis),
        *strides(weight), strides(bias)[0] if bias is not None else 0,
        *_line_strides(out, axis),
        SHARE=share,
        HAS_BIAS=bias is not None,
        COMPUTE=compute_dtype(x.dtype),
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        IDX64=needs_idx64(x, offset, weight, bias, out),
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )


# ---------------------------------------------------------------------------------------------
# Registry entry points (mixops.backend)
# ---------------------------------------------------------------------------------------------


def forward(x: torch.Tensor, offset: torch.Tensor, axis: str, share: int) -> torch.Tensor:
    """``mixops.atm_sample`` forward: ``x [B,H,W,C]``, ``offset [B,H,W,C/share]`` -> ``[B,H,W,C]``."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch_forward(x, offset, out, axis, share)
    return out


def backward(grads: list, needs: list, x: torch.Tensor, offset: torch.Tensor, axis: str, share: int) -> list:
    """``mixops.atm_sample`` backward: the gradients of the flagged inputs among (x, offset)."""
    need_x, need_off = needs
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
    go = torch.empty(offset.shape, dtype=offset.dtype, device=offset.device) if need_off else None
    launch_backward(grads[0], x, offset, gx, go, axis, share)
    return [g for g in (gx, go) if g is not None]


def fc_forward(x, offset, weight, bias, axis: str, share: int) -> torch.Tensor:
    """``mixops.atm_fc`` forward: ``[B,H,W,C] -> [B,H,W,C_out]``, the gather fused into the FC."""
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    launch_fc_forward(x, offset, weight, bias, out, axis, share)
    return out


def fc_backward(grads: list, needs: list, x, offset, weight, bias, axis: str, share: int) -> list:
    """``mixops.atm_fc`` backward: the gradients of the flagged inputs among (x, offset,
    weight, bias), deterministic (no atomics anywhere):

    - dS = g @ W (one GEMM), then the atm_sample backward kernel turns dS into gX and gOffset;
    - dW = g^T @ S, with S recomputed by the atm_sample forward kernel (a transient);
    - db = g summed over the pixels by _common.column_sum (shape-only split, fixed order).
    """
    need_x, need_off, need_w, need_b = needs
    g = grads[0]
    result = []
    if need_x or need_off:
        ds = torch.matmul(g, weight)
        result += backward([ds], [need_x, need_off], x, offset, axis, share)
    if need_w:
        s = forward(x, offset, axis, share)
        result.append((g.reshape(-1, g.shape[-1]).t() @ s.reshape(-1, s.shape[-1])).to(weight.dtype))
    if need_b:
        result.append(column_sum(g.reshape(1, -1, g.shape[-1]))[0].to(bias.dtype))
    return result
