# RepMLP's set-sharing partition FC with the global-perceptron gate as its epilogue
# (mixops.partition_fc), Triton backend.
#
# What it computes (docs/repmlp.md sections 3, 3.1, 3.2). x [N, C, H, W], partition (h, w),
# hw = h*w, S share-sets, Q = C/S, hp, wp = H/h, W/w, R = hp*wp*Q rows per image. Per share-set s
# the deploy fc3 is ONE GEMM
#     Z_s = X_s @ W_s^T + b_s        M = N*R rows, K = N_out = hw,  W_s = weight[s*hw:(s+1)*hw]
# whose row m = n*R + (i*wp + j)*Q + q is partition (i, j) of channel c = q*S + s of image n, and
# whose column p = y*w + xx is pixel (i*h + y, j*w + xx) of it. The offset of X_s[m, p] is a row
# part plus a column part, so x is read where it lies (no partition copy, any strides):
#     n*sN + c*sC + i*h*sH + j*w*sW   +   y*sH + xx*sW
# Row m of Z_s leaves through the official un-partition -- with rho = m % R,
#     c_o = (rho // (hp*wp))*S + s,   i' = (rho // wp) % hp,   j' = rho % wp
# it lands at n*oN + c_o*oC + i'*h*oH + j'*w*oW + y*oH + xx*oW, the identity map when hp*wp == 1 or
# Q == 1 and otherwise the channel/partition scramble the official code has (reproduced on
# purpose) -- and is multiplied there by gate[n, c_o], the global perceptron's sigmoid of the
# OUTPUT channel. The gate pools the input, so it exists before the GEMM: an epilogue multiply
# instead of a pass over the output.
#
# Backward, with dZ_s = gate[n, c_o] * dOut read through the output map (the gate is constant
# along a row):
#   dX_s = dZ_s @ W_s, written through the input map: the forward kernel with the maps swapped
#        and W not transposed (no reduction across programs: deterministic as it stands).
#   dgate[n, c_o] = sum over the hp*wp rows of (n, c_o) of  x_row . (W_s^T dOut_row) + dOut_row . b_s
#        -- the dX accumulator before its gate scale, dotted with the x tile in the epilogue, and the
#        dOut . b_s term from the K loop: per-(column tile, row) fp32 partials that
#        _common.column_sum adds in a fixed order.
#   dW_s = dZ_s^T @ X_s, db_s = colsum(dZ_s): split-M partials (the split a function of the
#        shapes alone, _common.deterministic_split), added by column_sum.
#
# FLOPs (numel = N*C*H*W = S*M*hw): forward 2*numel*hw; backward 2*numel*hw each for dX and dW.
# Minimal HBM bytes (e = element size): forward 2*numel*e + S*hw*hw*e (read x, write out, read W;
# bias and gate are S*hw and N*C values). The official deploy block moves 4*numel*e + W: fc3 writes
# z, the gate multiply reads z and writes out (and above one partition per map, the partition
# and un-partition permutes copy x and z once more each). Backward: dX 3*numel*e (read dOut and
# x, write dx) + W; dW/db 2*numel*e + S*hw*(hw+1)*e + the split partials.
#
# Sizes that shape the tiles (docs/repmlp.md section 8, batch 128): stage 1 is one large GEMM
# (S = 1, M = 8192, hw = 3136), stage 4 many small ones (S = 128, M = 512, hw = 49). Each
# share-set's rows fill whole tiles (512 rows = 8 tiles of 64 at stage 4), so share-sets are the
# grid's second axis rather than packed into one program; at batch 1 (4 rows per share-set) the
# 128 programs are one wave and the launch is what costs.
# Offsets are int32 unless a tensor's extent reaches 2**30 (IDX64, host-chosen).
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
    pow2_between,
    strides,
    vector_hint,
    vector_mask,
    vector_width,
    weight_operand,
)

# ---------------------------------------------------------------------------------------------
# The partition maps (JIT)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _input_rows(rows, s, Q, S, WP, R, PH, PW, s_n, s_c, s_h, s_w):
    """Offsets of the first pixel of GEMM rows ``rows`` of share-set s in the input map: row
    m = n*R + (i*WP + j)*Q + q is partition (i, j) of channel q*S + s of image n."""
    n = rows // R
    rho = rows % R
    q = rho % Q
    part = rho // Q
    return n * s_n + (q * S + s) * s_c + (part // WP) * PH * s_h + (part % WP) * PW * s_w


@triton.jit
def _output_rows(rows, s, S, HP, WP, R, PH, PW, s_n, s_c, s_h, s_w):
    """(n, c_o, offset of the first pixel) of GEMM rows ``rows`` of share-set s in the official
    un-partition map (docs/repmlp.md section 3.2): rho = m % R goes to channel
    (rho // (HP*WP))*S + s, partition ((rho // WP) % HP, rho % WP)."""
    n = rows // R
    rho = rows % R
    c_o = (rho // (HP * WP)) * S + s
    off = n * s_n + c_o * s_c + ((rho // WP) % HP) * PH * s_h + (rho % WP) * PW * s_w
    return n, c_o, off


@triton.jit
def _pixels(p, PIX_W, s_h, s_w):
    """Offsets of pixels p = y*PIX_W + xx inside a partition. PIX_W is the partition width, or
    hw where the host saw a partition's pixels lie as one run of the W stride (pixel_run): then
    p // hw == 0, the offset is p*s_w, and the host's vector hint may span whole pixel rows."""
    return (p // PIX_W) * s_h + (p % PIX_W) * s_w


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _partition_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, gate_ptr, c_ptr, x_ptr, dgate_ptr,
    M, HW, Q, S, HP, WP, PH, PW, PIX_A, PIX_C, PIX_X,
    sa_n, sa_c, sa_h, sa_w,
    sb_s, sb_k, sb_n, s_bias, sg_n, sg_c,
    sc_n, sc_c, sc_h, sc_w,
    sx_n, sx_c, sx_h, sx_w, sd_t, sd_r,
    BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, STORE_C: tl.constexpr,
    DGATE: tl.constexpr, IDX64: tl.constexpr, VEC_A: tl.constexpr, VEC_B: tl.constexpr, DIM_B: tl.constexpr,
    VEC_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Forward: c[out map] = gate * (a[in map] @ W_s^T + b_s). Backward (dX): c[in map] =
    gate * (a[out map] @ W_s), and with DGATE the dgate partials of its rows.

    a_ptr:     [N, C, H, W] the operand (x; dOut when BACKWARD), strides sa_n..sa_w
    w_ptr:     the weight [S*hw, hw] as B: B_s[k, n] at s*sb_s + k*sb_k + n*sb_n, vector hint
               VEC_B along tile dimension DIM_B (weight_operand)
    bias_ptr:  [S*hw] (HAS_BIAS), stride s_bias: added in the forward epilogue; in the backward
               only its dOut . b term of dgate
    gate_ptr:  [N, C] (HAS_GATE), strides sg_n, sg_c: indexed by the output channel c_o
    c_ptr:     [N, C, H, W] the result (out; dx when BACKWARD), strides sc_n..sc_w, written
               only if STORE_C (a dgate-only backward skips it)
    x_ptr:     [N, C, H, W] the forward input (DGATE only), strides sx_n..sx_w
    dgate_ptr: [cdiv(hw, BLOCK_N), HP*WP, N, C] fp32 (fp64) partials (DGATE only): the
               program of column tile t adds its rows' share at [t, rho % (HP*WP), n, c_o],
               strides sd_t, sd_r (n and c_o: C and 1)
    M = N*R GEMM rows of one share-set, HW = hw its columns and reduction; Q, S, HP, WP, PH, PW
    the map; PIX_A / PIX_C / PIX_X each tensor's pixel-row length (_pixels). Grid
    (cdiv(M, BLOCK_M) * cdiv(hw, BLOCK_N), S): program (tile, s).
    """
    s = tl.program_id(1)
    pid_m, pid_n, rows, cols, row_ok, col_ok = output_tile(M, HW, BLOCK_M, BLOCK_N, IDX64)
    R = HP * WP * Q
    if BACKWARD:
        n, c_o, a_rows = _output_rows(rows, s, S, HP, WP, R, PH, PW, sa_n, sa_c, sa_h, sa_w)
        c_rows = _input_rows(rows, s, Q, S, WP, R, PH, PW, sc_n, sc_c, sc_h, sc_w)
    else:
        a_rows = _input_rows(rows, s, Q, S, WP, R, PH, PW, sa_n, sa_c, sa_h, sa_w)
        n, c_o, c_rows = _output_rows(rows, s, S, HP, WP, R, PH, PW, sc_n, sc_c, sc_h, sc_w)
    b_base = w_ptr + s.to(tl.int64) * sb_s
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    bias_dot = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(0, HW, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < HW
        # masks constant over each vector (host: VEC divides hw); else hw = 196 cuts them to scalars
        b = tl.load(vector_hint(b_base, ks[:, None] * sb_k + cols[None, :] * sb_n, VEC_B, DIM_B),
                    mask=vector_mask(k_ok, col_ok, VEC_B, DIM_B), other=0.0)  # fmt: skip
        a_offs = a_rows[:, None] + _pixels(ks, PIX_A, sa_h, sa_w)[None, :]
        a = tl.load(vector_hint(a_ptr, a_offs, VEC_A, 1), mask=vector_mask(row_ok, k_ok, VEC_A, 1),
                    other=0.0)  # fmt: skip
        if BACKWARD and DGATE and HAS_BIAS:
            # dOut_row . b_s, the part of dgate that does not go through W
            bias_k = tl.load(bias_ptr + (s * HW + ks) * s_bias, mask=k_ok, other=0.0)
            bias_dot += tl.sum(a.to(ACC_DTYPE) * bias_k.to(ACC_DTYPE)[None, :], axis=1)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if BACKWARD and DGATE:
        # x . (W_s^T dOut) over this tile's columns: the gate's gradient, before the gate scales acc
        x_rows = _input_rows(rows, s, Q, S, WP, R, PH, PW, sx_n, sx_c, sx_h, sx_w)
        x = tl.load(x_ptr + x_rows[:, None] + _pixels(cols, PIX_X, sx_h, sx_w)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        row_dot = tl.sum(acc * x.to(ACC_DTYPE), axis=1)
        row_dot += tl.where(pid_n == 0, bias_dot, 0.0)
        d_offs = pid_n * sd_t + (rows % R) % (HP * WP) * sd_r + n * (S * Q) + c_o
        tl.store(dgate_ptr + d_offs, row_dot, mask=row_ok)
    if not BACKWARD and HAS_BIAS:
        acc += tl.load(bias_ptr + (s * HW + cols) * s_bias, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_GATE:
        acc *= tl.load(gate_ptr + n * sg_n + c_o * sg_c, mask=row_ok, other=0.0).to(ACC_DTYPE)[:, None]
    if STORE_C:
        c_offs = c_rows[:, None] + _pixels(cols, PIX_C, sc_h, sc_w)[None, :]
        tl.store(vector_hint(c_ptr, c_offs, VEC_C, 1), acc.to(c_ptr.dtype.element_ty),
                 mask=vector_mask(row_ok, col_ok, VEC_C, 1))  # fmt: skip


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, gate_ptr, dw_ptr, db_ptr,
    M, HW, Q, S, HP, WP, PH, PW, PIX_G, PIX_X, ROWS, SPLIT,
    sg_n, sg_c, sg_h, sg_w,
    sx_n, sx_c, sx_h, sx_w,
    sgate_n, sgate_c, sdw_s, sdw_q, sdw_p, sdb_s, sdb_q,
    HAS_GATE: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, IDX64: tl.constexpr,
    VEC_G: tl.constexpr, VEC_X: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Split-M partials of dW_s = dZ_s^T @ X_s and db_s = colsum(dZ_s), dZ_s = gate * dOut
    through the output map.

    g_ptr:    [N, C, H, W] dOut, strides sg_n..sg_w
    x_ptr:    [N, C, H, W] the forward input (HAS_DW), strides sx_n..sx_w
    gate_ptr: [N, C] (HAS_GATE), strides sgate_n, sgate_c
    dw_ptr:   [SPLIT, S*hw, hw] partials, dw[r, s*hw + q, p] at r*sdw_s + .. (HAS_DW)
    db_ptr:   [SPLIT, S*hw] partials (HAS_DB; written by the programs of the first p tile)
    Program (tile, s*SPLIT + r) sums GEMM rows [r*ROWS, (r+1)*ROWS) of share-set s for the
    output tile (tile // cdiv(hw, BLOCK_P), tile % cdiv(hw, BLOCK_P)), BLOCK_M rows a step.
    The map arguments are those of _partition_gemm_kernel.
    """
    pid = tl.program_id(0)
    s = tl.program_id(1) // SPLIT
    r = tl.program_id(1) % SPLIT
    num_p = tl.cdiv(HW, BLOCK_P) if HAS_DW else 1
    qs = (pid // num_p) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ps = (pid % num_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = qs < HW
    p_ok = ps < HW
    R = HP * WP * Q
    if IDX64:
        start = r.to(tl.int64) * ROWS
    else:
        start = r * ROWS
    stop = tl.minimum(start + ROWS, M)
    g_pix = _pixels(qs, PIX_G, sg_h, sg_w)
    x_pix = _pixels(ps, PIX_X, sx_h, sx_w)
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_Q,), dtype=ACC_DTYPE)
    for m0 in range(start, stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < stop
        n, c_o, g_rows = _output_rows(ms, s, S, HP, WP, R, PH, PW, sg_n, sg_c, sg_h, sg_w)
        # dZ^T [BLOCK_Q, BLOCK_M]: the row offsets vary along the tile's second dimension
        g_t = tl.load(vector_hint(g_ptr, g_pix[:, None] + g_rows[None, :], VEC_G, 0),
                      mask=vector_mask(q_ok, m_ok, VEC_G, 0), other=0.0).to(ACC_DTYPE)  # fmt: skip
        if HAS_GATE:
            g_t *= tl.load(gate_ptr + n * sgate_n + c_o * sgate_c, mask=m_ok, other=0.0).to(ACC_DTYPE)[None, :]
        if HAS_DW:
            x_rows = _input_rows(ms, s, Q, S, WP, R, PH, PW, sx_n, sx_c, sx_h, sx_w)
            x = tl.load(vector_hint(x_ptr, x_rows[:, None] + x_pix[None, :], VEC_X, 1),
                        mask=vector_mask(m_ok, p_ok, VEC_X, 1), other=0.0)  # fmt: skip
            acc = tl.dot(g_t.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DB:
            db_acc += tl.sum(g_t, axis=1)
    w_rows = s * HW + qs
    if HAS_DW:
        dw_offs = r.to(tl.int64) * sdw_s + w_rows[:, None] * sdw_q + ps[None, :] * sdw_p
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=q_ok[:, None] & p_ok[None, :])
    if HAS_DB:
        tl.store(db_ptr + r.to(tl.int64) * sdb_s + w_rows * sdb_q, db_acc.to(db_ptr.dtype.element_ty),
                 mask=q_ok & (pid % num_p == 0))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Geometry and block-size heuristics
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The partition map of one call: x [N, C, H, W], partition (PH, PW), S share-sets."""

    N: int
    C: int
    S: int
    HP: int
    WP: int
    PH: int
    PW: int

    @property
    def Q(self) -> int:
        return self.C // self.S

    @property
    def hw(self) -> int:
        return self.PH * self.PW

    @property
    def M(self) -> int:
        """GEMM rows of one share-set: every partition of every channel of the share-set."""
        return self.N * self.HP * self.WP * self.Q

    @property
    def args(self) -> tuple[int, ...]:
        """The runtime map arguments of both kernels."""
        return (self.M, self.hw, self.Q, self.S, self.HP, self.WP, self.PH, self.PW)


def geometry(shape: tuple[int, ...], partition, num_sharesets: int) -> Geometry:
    """The map of x of ``shape`` [N, C, H, W] (validated by mixops.ops.repmlp)."""
    N, C, H, W = shape
    ph, pw = partition
    return Geometry(N, C, num_sharesets, H // ph, W // pw, ph, pw)


def pixel_run(t: torch.Tensor, geo: Geometry) -> tuple[int, int]:
    """(PIX, VEC) of t [N, C, H, W] for _pixels: PIX = hw when a partition's pixels lie as one
    run of stride W-stride (one pixel row, or rows that follow each other: the contiguous map at
    native resolution), else the partition width; VEC the vector hint along those runs
    (vector_width of t seen as [N, C, HP, WP, pixels])."""
    sn, sc, sh, sw = t.stride()
    run = geo.PH == 1 or sh == geo.PW * sw
    if run:
        view = t.as_strided((geo.N, geo.C, geo.HP, geo.WP, geo.hw), (sn, sc, geo.PH * sh, geo.PW * sw, sw))
        return geo.hw, vector_width(view, -1, geo.hw)
    view = t.as_strided((geo.N, geo.C, geo.HP, geo.WP, geo.PH, geo.PW), (sn, sc, geo.PH * sh, geo.PW * sw, sh, sw))
    return geo.PW, vector_width(view, -1, geo.PW)


def gemm_blocks(M: int, hw: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the forward / dX GEMM (m rows, n columns, k reduction step), spill-free on
    sm_90 (tests/test_repmlp_sm90.py). Half types at hw >= 1024 (stage 1, one GEMM with
    K = N_out = hw = 3136, compute-bound) take a 128 x 128 x 64 tile at 8 warps (untimed: no
    GPU has run it yet); smaller hw, where every share-set is a handful of tiles,
    the 64 x 64 tiles of the other families; fp32 needs the 16-deep step (an IEEE tl.dot is
    unrolled FMAs), fp64 a 64 x 32 tile. Under the interpreter, the fewest programs."""
    if interpreting():
        return interpreter_gemm_blocks(M, hw, hw)
    n = pow2_between(hw, 16, 64)
    if dtype == torch.float64:
        return Blocks(m=64, n=min(n, 32), k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(m=64, n=n, k=16, num_warps=4, num_stages=3)
    if hw >= 1024:
        return Blocks(m=128, n=128, k=64, num_warps=8, num_stages=3)
    return Blocks(m=64, n=n, k=pow2_between(hw, 16, 32), num_warps=4, num_stages=3)


def weight_grad_blocks(M: int, hw: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the dW/db kernel: m = BLOCK_Q (dW rows), n = BLOCK_P (dW columns), k = BLOCK_M
    (GEMM rows reduced per step), spill-free on sm_90 (tests/test_repmlp_sm90.py). Under the
    interpreter the whole row range in one step where it fits."""
    if interpreting():
        b = interpreter_gemm_blocks(hw, hw, M)
        return Blocks(m=b.m, n=b.n, k=b.k, num_warps=4, num_stages=1)
    n = pow2_between(hw, 16, 128)
    if dtype == torch.float64:
        return Blocks(m=32, n=min(n, 32), k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(m=64, n=min(n, 32), k=16, num_warps=4, num_stages=2)
    return Blocks(m=min(n, 128), n=n, k=32, num_warps=8 if n == 128 else 4, num_stages=2)


def weight_grad_split(geo: Geometry, dtype: torch.dtype) -> int:
    """How many fixed row ranges each share-set's dW/db is split into: deterministic_split over
    its M rows for the S * dW tiles -- a function of the shapes and dtype alone."""
    b = weight_grad_blocks(geo.M, geo.hw, dtype)
    tiles = geo.S * triton.cdiv(geo.hw, b.m) * triton.cdiv(geo.hw, b.n)
    split = deterministic_split(geo.M, b.k, tiles)
    rows = triton.cdiv(triton.cdiv(max(geo.M, 1), split), b.k) * b.k
    return triton.cdiv(max(geo.M, 1), rows)  # no empty range


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _weight_2d(weight: torch.Tensor) -> torch.Tensor:
    """fc3.weight [S*hw, hw, 1, 1] as the [S*hw, hw] matrix (a view)."""
    return weight.reshape(weight.shape[0], weight.shape[1])


def launch_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    c: torch.Tensor | None,
    geo: Geometry,
    backward: bool,
    x: torch.Tensor | None = None,
    dgate_part: torch.Tensor | None = None,
) -> None:
    """Forward (``backward`` False): c <- gate * (a @ W^T + b) through the maps. dX: c <- gate *
    (a @ W) with a = dOut, and with ``dgate_part`` ([cdiv(hw, BLOCK_N), HP*WP, N, C]
    contiguous, from dgate_partials) its dgate partials, x the forward input. a, c, x: [N, C, H,
    W] of any strides (c must not overlap itself; None: a dgate-only backward); gate [N, C]."""
    if geo.M == 0:
        return
    blocks = gemm_blocks(geo.M, geo.hw, a.dtype)
    dot_dtype, acc_dtype, precision = dot_dtypes(a.dtype)
    w2 = _weight_2d(weight)
    sb_k, sb_n, vec_b, dim_b = weight_operand(w2, transpose_weight=not backward, extent=geo.hw)
    pix_a, vec_a = pixel_run(a, geo)
    pix_c, vec_c = pixel_run(c, geo) if c is not None else (1, 1)
    pix_x = pixel_run(x, geo)[0] if x is not None else 1
    grid = (triton.cdiv(geo.M, blocks.m) * triton.cdiv(geo.hw, blocks.n), geo.S)
    _partition_gemm_kernel[grid](
        a, w2, bias if bias is not None else w2, gate if gate is not None else w2, c if c is not None else a,
        x if x is not None else a, dgate_part if dgate_part is not None else w2,
        *geo.args, pix_a, pix_c, pix_x,
        *strides(a),
        geo.hw * w2.stride(0), sb_k, sb_n, bias.stride(0) if bias is not None else 0,
        *(strides(gate) if gate is not None else (0, 0)),
        *(strides(c) if c is not None else (0, 0, 0, 0)),
        *(strides(x) if x is not None else (0, 0, 0, 0)),
        *(dgate_part.stride()[:2] if dgate_part is not None else (0, 0)),
        BACKWARD=backward, HAS_BIAS=bias is not None, HAS_GATE=gate is not None, STORE_C=c is not None,
        DGATE=dgate_part is not None, IDX64=needs_idx64(a, c, x, w2, dgate_part),
        VEC_A=vec_a, VEC_B=vec_b, DIM_B=dim_b, VEC_C=vec_c,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def dgate_partials(geo: Geometry, dtype: torch.dtype, device) -> torch.Tensor:
    """The [cdiv(hw, BLOCK_N), HP*WP, N, C] accumulate-dtype buffer the dX launch fills with
    its dgate partials: one per column tile and per partition of each (n, c_o)."""
    tiles = triton.cdiv(geo.hw, gemm_blocks(geo.M, geo.hw, dtype).n)
    return torch.empty((tiles, geo.HP * geo.WP, geo.N, geo.C), dtype=accumulate_dtype(dtype), device=device)


def weight_grads(
    g: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    geo: Geometry, need_w: bool, need_b: bool,
) -> list[torch.Tensor]:
    """[dW][, db], those flagged, in weight's / bias's dtype and shape: weight_grad_split
    partials per share-set (fp32; fp64 for fp64), added up by column_sum in a fixed order.
    Needs M > 0 (backward returns zeros before it for an empty input)."""
    acc = accumulate_dtype(x.dtype)
    S_hw, hw = geo.S * geo.hw, geo.hw
    split = weight_grad_split(geo, x.dtype)
    dw_part = torch.empty((split, S_hw, hw), dtype=acc, device=x.device) if need_w else None
    db_part = torch.empty((split, S_hw), dtype=acc, device=x.device) if need_b else None
    blocks = weight_grad_blocks(geo.M, hw, x.dtype)
    dot_dtype, acc_dtype, precision = dot_dtypes(x.dtype)
    rows = triton.cdiv(triton.cdiv(geo.M, split), blocks.k) * blocks.k
    pix_g, vec_g = pixel_run(g, geo)
    pix_x, vec_x = pixel_run(x, geo)
    part = dw_part if dw_part is not None else db_part
    num_p = triton.cdiv(hw, blocks.n) if need_w else 1
    _weight_grad_kernel[(triton.cdiv(hw, blocks.m) * num_p, geo.S * split)](
        g, x, gate if gate is not None else part, part if dw_part is None else dw_part,
        part if db_part is None else db_part,
        *geo.args, pix_g, pix_x, rows, split,
        *strides(g), *strides(x),
        *(strides(gate) if gate is not None else (0, 0)),
        *(dw_part.stride() if dw_part is not None else (0, 0, 0)),
        *(db_part.stride() if db_part is not None else (0, 0)),
        HAS_GATE=gate is not None, HAS_DW=need_w, HAS_DB=need_b, IDX64=needs_idx64(g, x, dw_part),
        VEC_G=vec_g, VEC_X=vec_x, BLOCK_Q=blocks.m, BLOCK_P=blocks.n, BLOCK_M=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return [
        column_sum(p.view(1, split, -1)).view(t.shape).to(t.dtype)
        for p, t in ((dw_part, weight), (db_part, bias))
        if p is not None
    ]


# ---------------------------------------------------------------------------------------------
# Registry entry points (mixops.backend.register("partition_fc", "triton", ...))
# ---------------------------------------------------------------------------------------------


def forward(x, weight, bias, gate, partition, num_sharesets):
    """The ``triton`` forward of ``mixops::partition_fc``: a fresh contiguous [N, C, H, W]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch_gemm(x, weight, bias, gate, out, geometry(tuple(x.shape), partition, num_sharesets), backward=False)
    return out


def backward(grads, needs, x, weight, bias, gate, partition, num_sharesets):
    """The ``triton`` backward: gradients of the flagged inputs among (x, weight, bias, gate)."""
    need_x, need_w, need_b, need_gate = needs
    g = grads[0]
    geo = geometry(tuple(x.shape), partition, num_sharesets)
    if geo.M == 0:  # an empty batch or map: nothing to launch, every gradient is zero
        return [torch.zeros_like(t) for t, need in zip((x, weight, bias, gate), needs) if need]
    got = {}
    if need_x or need_gate:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        part = dgate_partials(geo, x.dtype, x.device) if need_gate else None
        launch_gemm(g, weight, bias, gate, dx, geo, backward=True, x=x, dgate_part=part)
        got["x"] = dx
        if need_gate:
            tiles = part.shape[0] * part.shape[1]
            got["gate"] = column_sum(part.view(1, tiles, -1)).view(gate.shape).to(gate.dtype)
    if need_w or need_b:
        grads_wb = iter(weight_grads(g, x, gate, weight, bias, geo, need_w, need_b))
        if need_w:
            got["weight"] = next(grads_wb)
        if need_b:
            got["bias"] = next(grads_wb)
    return [got[name] for name, need in zip(("x", "weight", "bias", "gate"), needs) if need]
