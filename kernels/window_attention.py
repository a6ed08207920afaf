# UniFormer's windowed / global multi-head attention (mixops::window_attention), Triton backend.
#
# What it computes (docs/window_attention.md sections 2.4-2.8). qkv [B, (T,) H, W, 3C], channel
# [q|k|v] x head x d; per ws x ws window anchored at (0, 0) (or one window over all T*H*W tokens
# for global attention) and head h: out = softmax(scale q k^T) v over the window's keys. Edge
# windows are completed bottom/right: padding "bias" (UniFormer) gives every padded token
# q, k, v = the qkv bias slices and masks nothing; "mask" excludes them.
#
# Why fused. The official block pads the LayerNorm output, partitions it into windows (a copy),
# runs qkv on the padded map, materialises the [windows, heads, ws^2, ws^2] scores, and reverses
# and crops the partition (two more copies). Here a program reads its window's real tokens where
# they lie in qkv (the window map in the load), keeps the scores in registers (online softmax)
# and writes only real pixels of out [B, (T,) H, W, C]: HBM sees qkv once (K/V re-read per
# query block, from L2) and out once. At UniFormer-S stage 3 for ADE20K (32 x 32 padded to
# 42 x 42 at ws 14) that is 1.72x fewer tokens than the official padded map.
#
# The padded keys of an edge window are identical (k = b_k, v = b_v), so "bias" padding is ONE
# virtual key per window with logit scale*q.b_k + ln(n_pad) and value b_v (exact to rounding,
# docs section 2.6); padded query rows are never computed (the crop discards them).
#
# Backward (FlashAttention-2 style, no atomics, every output written by one program): the
# forward is recomputed for out and the row log-sum-exp lse (the op saves only its inputs),
# delta = rowsum(dO * out); then
#   _key_grad_kernel          per (window, head, key block): dK, dV over every query block,
#                             into the k and v slots of a [B, (T,) H, W, 3C] gradient (no
#                             partition copy);
#   _query_grad_kernel        per (window, head, query block): dQ over every key block (+ the
#                             virtual key's share scale*dS_v*b_k), into the q slots;
#   _virtual_key_grad_kernel  per (window, head): the virtual key's dk, dv (the summed gradient of
#                             its n_pad keys by construction, section 2.7) as partials of the
#                             bias gradient, added over the windows in a fixed order (column_sum).
#
# Token map: a window's real tokens are enumerated row-major, u -> (row r0 + u // cols,
# column c0 + u % cols), so no padded token is ever loaded; a row of a video clip is (t, y),
# r = t*H + y, two strides apart (the T*H rows of global attention over T*H*W tokens).
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import accumulate_dtype, column_sum, dot_dtypes, interpreting, needs_idx64, tf32_allowed

__all__ = ["Geometry", "Tiles", "attention_tiles", "backward", "forward", "geometry", "launch_forward"]

# ---------------------------------------------------------------------------------------------
# Geometry and tiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The op's problem: B images of R = T*H rows x W columns, windows of WR x WC tokens."""

    B: int
    T: int
    H: int
    W: int
    C: int
    heads: int
    d: int
    wr: int  # window rows: ws, or all T*H rows for global attention
    wc: int  # window columns: ws, or all W

    @property
    def rows(self) -> int:
        return self.T * self.H

    @property
    def windows(self) -> int:
        """Windows per image."""
        return triton.cdiv(self.rows, self.wr) * triton.cdiv(self.W, self.wc)

    @property
    def window_tokens(self) -> int:
        return min(self.wr, self.rows) * min(self.wc, self.W)


def geometry(qkv: torch.Tensor, num_heads: int, window_size: int | None) -> Geometry:
    B, *mid, W, C3 = qkv.shape
    T, H = (1, mid[0]) if len(mid) == 1 else mid
    C = C3 // 3
    if window_size is None:
        return Geometry(B, T, H, W, C, num_heads, C // num_heads, T * H, W)
    return Geometry(B, T, H, W, C, num_heads, C // num_heads, window_size, window_size)


@dataclass(frozen=True)
class Tiles:
    bq: int  # query tokens per block
    bk: int  # key tokens per step
    dp: int  # head dim, padded to a power of two >= 16 (tl.dot)
    num_warps: int


def attention_tiles(g: Geometry, dtype: torch.dtype) -> Tiles:
    """Query x key tiles of a padded head dim (d = 32, 64 in the configs) with 4 warps on a GPU,
    the largest that ptxas fits without spills on sm_90 at UniFormer-S stage 3 (d = 64;
    tests/test_window_attention_triton.py): fp16/bf16 64 x 64 (175-252 registers); TF32 32 x 64
    (150-237; its 4-byte operands spilled at 64 x 64); IEEE fp32 and fp64 run every tl.dot as
    FMAs with both operand tiles in registers: 16 x 32 (64 x 64 spilled 9-57 KB, 32 x 32 1.3 KB
    in the key-gradient kernel). Under the interpreter (~1 ms per program and step) blocks as
    large as a window of up to 128 tokens, so a small window is one program and one step."""
    dp = max(16, triton.next_power_of_2(g.d))
    if interpreting():
        b = max(16, min(128, triton.next_power_of_2(g.window_tokens)))
        return Tiles(bq=b, bk=b, dp=dp, num_warps=4)
    if dtype in (torch.float16, torch.bfloat16):
        return Tiles(bq=64, bk=64, dp=dp, num_warps=4)
    if dtype == torch.float32 and tf32_allowed():
        return Tiles(bq=32, bk=64, dp=dp, num_warps=4)
    return Tiles(bq=16, bk=32, dp=dp, num_warps=4)


def _views(t: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, X] view of an image [B, H, W, X] (T = 1) or video [B, T, H, W, X] tensor."""
    return t.unsqueeze(1) if t.dim() == 4 else t


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _window(pid, R, W, WR, WC, HEADS):
    """Window and head of program pid (window-major over images, heads minor): (b, h, first
    row, first column, real columns, real tokens, padded tokens)."""
    h = pid % HEADS
    win = pid // HEADS
    n_wc = tl.cdiv(W, WC)
    per_image = tl.cdiv(R, WR) * n_wc
    b = win // per_image
    r0 = ((win % per_image) // n_wc) * WR
    c0 = (win % n_wc) * WC
    rows = tl.minimum(WR, R - r0)
    cols = tl.minimum(WC, W - c0)
    return b, h, r0, c0, cols, rows * cols, WR * WC - rows * cols


@triton.jit
def _tokens(b, u, r0, c0, cols, n_real, H, s_b, s_t, s_h, s_w, IDX64: tl.constexpr):
    """Element offsets of window tokens u (row-major over the real tokens) in a [B, T, H, W, .]
    tensor of strides s_*, and their mask."""
    r = r0 + u // cols
    c = c0 + u % cols
    if IDX64:
        b = b.to(tl.int64)
        r = r.to(tl.int64)
    return b * s_b + (r // H) * s_t + (r % H) * s_h + c * s_w, u < n_real


@triton.jit
def _stat_offsets(b, u, r0, c0, cols, h, R, W, HEADS):
    """Offsets of window tokens u of head h in a contiguous [B, R, W, HEADS] statistic."""
    return ((b * R + r0 + u // cols) * W + c0 + u % cols) * HEADS + h


@triton.jit
def _load_head(ptr, offs, ok, channel0, e, D, DOT_DTYPE: tl.constexpr, s_c):
    """[len(offs), DP] tile of one head's channels channel0 + e (e < D) of the tokens at offs."""
    return tl.load(ptr + offs[:, None] + (channel0 + e)[None, :] * s_c, mask=ok[:, None] & (e < D)[None, :],
                   other=0.0).to(DOT_DTYPE)  # fmt: skip


@triton.jit
def _virtual_logit(q, bias_ptr, k0, e, D, n_pad, scale, s_bias, ACC_DTYPE: tl.constexpr):
    """[BQ] logit of the virtual key (the n_pad padded keys as one): scale*q.b_k + ln(n_pad),
    -inf when the window has no padding; b_k = bias[k0 + e]."""
    bk = tl.load(bias_ptr + (k0 + e) * s_bias, mask=e < D, other=0.0).to(ACC_DTYPE)
    s = tl.sum(q.to(ACC_DTYPE) * bk[None, :], axis=1) * scale
    return tl.where(n_pad > 0, s + tl.log(tl.maximum(n_pad, 1).to(ACC_DTYPE)), float("-inf"))


@triton.jit
def _keys(qkv_ptr, b, uk, r0, c0, cols, n_real, H, C, h, e, D, sq_b, sq_t, sq_h, sq_w, sq_c,
          IDX64: tl.constexpr, DOT_DTYPE: tl.constexpr):  # fmt: skip
    """(k, v, valid) of window tokens uk: [len(uk), DP] tiles of head h."""
    offs, ok = _tokens(b, uk, r0, c0, cols, n_real, H, sq_b, sq_t, sq_h, sq_w, IDX64)
    k = _load_head(qkv_ptr, offs, ok, C + h * D, e, D, DOT_DTYPE, sq_c)
    return k, _load_head(qkv_ptr, offs, ok, 2 * C + h * D, e, D, DOT_DTYPE, sq_c), ok


@triton.jit
def _query_grad_inputs(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr, b, uq, r0, c0, cols, n_real, R, H, W, h, e, D, HEADS,
    sq_b, sq_t, sq_h, sq_w, sq_c, sd_b, sd_t, sd_h, sd_w, sd_c, IDX64: tl.constexpr, DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    """What every backward kernel reads of window tokens uq as queries: (q, dOut, lse, delta,
    valid), q and dOut [len(uq), DP] tiles of head h."""
    q_offs, ok = _tokens(b, uq, r0, c0, cols, n_real, H, sq_b, sq_t, sq_h, sq_w, IDX64)
    d_offs, _ = _tokens(b, uq, r0, c0, cols, n_real, H, sd_b, sd_t, sd_h, sd_w, IDX64)
    stat = _stat_offsets(b, uq, r0, c0, cols, h, R, W, HEADS)
    return (_load_head(qkv_ptr, q_offs, ok, h * D, e, D, DOT_DTYPE, sq_c),
            _load_head(do_ptr, d_offs, ok, h * D, e, D, DOT_DTYPE, sd_c),
            tl.load(lse_ptr + stat, mask=ok, other=0.0), tl.load(delta_ptr + stat, mask=ok, other=0.0), ok)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    qkv_ptr, bias_ptr, out_ptr, lse_ptr,
    R, H, W, C, D, WR, WC, HEADS, scale,
    sq_b, sq_t, sq_h, sq_w, sq_c, s_bias, so_b, so_t, so_h, so_w, so_c,
    VIRTUAL: tl.constexpr, IDX64: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out and lse of query block pid1 of window-head pid0.

    qkv_ptr  [B, T, H, W, 3C] strides sq_*: q at channel h*D + e, k at C + h*D + e, v at 2C + ...
    bias_ptr [3C] the qkv bias (s_bias), read when VIRTUAL ("bias" padding)
    out_ptr  [B, T, H, W, C] strides so_*;  lse_ptr [B, R, W, HEADS] contiguous, ACC_DTYPE
    R = T*H rows; windows of WR x WC tokens; D the head dim (padded to DP).
    """
    b, h, r0, c0, cols, n_real, n_pad = _window(tl.program_id(0), R, W, WR, WC, HEADS)
    q0 = tl.program_id(1) * BQ
    if q0 < n_real:  # query blocks past a small edge window have nothing to do
        e = tl.arange(0, DP)
        uq = q0 + tl.arange(0, BQ)
        q_offs, q_ok = _tokens(b, uq, r0, c0, cols, n_real, H, sq_b, sq_t, sq_h, sq_w, IDX64)
        q = _load_head(qkv_ptr, q_offs, q_ok, h * D, e, D, DOT_DTYPE, sq_c)
        m = tl.full([BQ], float("-inf"), ACC_DTYPE)
        l = tl.zeros([BQ], ACC_DTYPE)
        acc = tl.zeros([BQ, DP], ACC_DTYPE)
        for k0 in range(0, n_real, BK):
            k, v, k_ok = _keys(qkv_ptr, b, k0 + tl.arange(0, BK), r0, c0, cols, n_real, H, C, h, e, D,
                               sq_b, sq_t, sq_h, sq_w, sq_c, IDX64, DOT_DTYPE)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE) * scale
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            rescale = tl.exp(m - m_new)
            l = l * rescale + tl.sum(p, axis=1)
            acc = tl.dot(p.to(DOT_DTYPE), v, acc * rescale[:, None], input_precision=PRECISION, out_dtype=ACC_DTYPE)
            m = m_new
        if VIRTUAL:
            s_v = _virtual_logit(q, bias_ptr, C + h * D, e, D, n_pad, scale, s_bias, ACC_DTYPE)
            bv = tl.load(bias_ptr + (2 * C + h * D + e) * s_bias, mask=e < D, other=0.0).to(ACC_DTYPE)
            m_new = tl.maximum(m, s_v)
            p_v = tl.exp(s_v - m_new)
            rescale = tl.exp(m - m_new)
            l = l * rescale + p_v
            acc = acc * rescale[:, None] + p_v[:, None] * bv[None, :]
            m = m_new
        o_offs, o_ok = _tokens(b, uq, r0, c0, cols, n_real, H, so_b, so_t, so_h, so_w, IDX64)
        tl.store(out_ptr + o_offs[:, None] + (h * D + e)[None, :] * so_c, (acc / l[:, None]).to(out_ptr.dtype.element_ty),
                 mask=o_ok[:, None] & (e < D)[None, :])  # fmt: skip
        tl.store(lse_ptr + _stat_offsets(b, uq, r0, c0, cols, h, R, W, HEADS), m + tl.log(l), mask=q_ok)


@triton.jit
def _key_grad_kernel(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    R, H, W, C, D, WR, WC, HEADS, scale,
    sq_b, sq_t, sq_h, sq_w, sq_c, sd_b, sd_t, sd_h, sd_w, sd_c, sg_b, sg_t, sg_h, sg_w, sg_c,
    IDX64: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV of key block pid1 of window-head pid0, summed over every query block of the window,
    into the k and v slots of dqkv_ptr.

    qkv_ptr: as _forward_kernel;  do_ptr [B, T, H, W, C] dOut (sd_*)
    lse_ptr, delta_ptr [B, R, W, HEADS] contiguous, ACC_DTYPE: the forward's row lse and
        rowsum(dOut * out)
    dqkv_ptr [B, T, H, W, 3C] (sg_*)
    """
    b, h, r0, c0, cols, n_real, n_pad = _window(tl.program_id(0), R, W, WR, WC, HEADS)
    k0 = tl.program_id(1) * BK
    if k0 < n_real:
        e = tl.arange(0, DP)
        uk = k0 + tl.arange(0, BK)
        k, v, k_ok = _keys(qkv_ptr, b, uk, r0, c0, cols, n_real, H, C, h, e, D, sq_b, sq_t, sq_h, sq_w, sq_c, IDX64,
                           DOT_DTYPE)  # fmt: skip
        dk = tl.zeros([BK, DP], ACC_DTYPE)
        dv = tl.zeros([BK, DP], ACC_DTYPE)
        for q0 in range(0, n_real, BQ):
            q, do, lse, delta, q_ok = _query_grad_inputs(
                qkv_ptr, do_ptr, lse_ptr, delta_ptr, b, q0 + tl.arange(0, BQ), r0, c0, cols, n_real, R, H, W, h, e, D,
                HEADS, sq_b, sq_t, sq_h, sq_w, sq_c, sd_b, sd_t, sd_h, sd_w, sd_c, IDX64, DOT_DTYPE)  # fmt: skip
            # P^T [BK, BQ]; padded keys and query rows give 0 (their lse of 0 would not: masked)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC_DTYPE) * scale
            pt = tl.where(k_ok[:, None] & q_ok[None, :], tl.exp(st - lse[None, :]), 0.0)
            dv = tl.dot(pt.to(DOT_DTYPE), do, dv, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(DOT_DTYPE), q, dk, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        g_offs, _ = _tokens(b, uk, r0, c0, cols, n_real, H, sg_b, sg_t, sg_h, sg_w, IDX64)
        mask = k_ok[:, None] & (e < D)[None, :]
        g = dqkv_ptr + g_offs[:, None]
        tl.store(g + (C + h * D + e)[None, :] * sg_c, (dk * scale).to(dqkv_ptr.dtype.element_ty), mask=mask)
        tl.store(g + (2 * C + h * D + e)[None, :] * sg_c, dv.to(dqkv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _virtual_key_grad_kernel(
    qkv_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, part_ptr,
    R, H, W, C, D, WR, WC, HEADS, scale,
    sq_b, sq_t, sq_h, sq_w, sq_c, s_bias, sd_b, sd_t, sd_h, sd_w, sd_c,
    IDX64: tl.constexpr, BQ: tl.constexpr, DP: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """The virtual key's (dk, dv) of window-head pid0 ("bias" padding): the summed gradients of
    its n_pad padded keys (docs/window_attention.md section 2.7), zeros for a window without
    padding, into part_ptr [windows * HEADS, 2, DP] (contiguous, ACC_DTYPE). Other pointers as
    _key_grad_kernel; bias_ptr [3C] the qkv bias (s_bias)."""
    b, h, r0, c0, cols, n_real, n_pad = _window(tl.program_id(0), R, W, WR, WC, HEADS)
    e = tl.arange(0, DP)
    bv = tl.load(bias_ptr + (2 * C + h * D + e) * s_bias, mask=e < D, other=0.0).to(ACC_DTYPE)
    dk = tl.zeros([DP], ACC_DTYPE)
    dv = tl.zeros([DP], ACC_DTYPE)
    for q0 in range(0, n_real, BQ):
        q, do, lse, delta, q_ok = _query_grad_inputs(
            qkv_ptr, do_ptr, lse_ptr, delta_ptr, b, q0 + tl.arange(0, BQ), r0, c0, cols, n_real, R, H, W, h, e, D,
            HEADS, sq_b, sq_t, sq_h, sq_w, sq_c, sd_b, sd_t, sd_h, sd_w, sd_c, IDX64, DOT_DTYPE)  # fmt: skip
        q = q.to(ACC_DTYPE)
        do = do.to(ACC_DTYPE)
        s_v = _virtual_logit(q, bias_ptr, C + h * D, e, D, n_pad, scale, s_bias, ACC_DTYPE)
        p_v = tl.where(q_ok, tl.exp(s_v - lse), 0.0)
        ds_v = p_v * (tl.sum(do * bv[None, :], axis=1) - delta)
        dv += tl.sum(p_v[:, None] * do, axis=0)
        dk += tl.sum(ds_v[:, None] * q, axis=0)
    part = part_ptr + tl.program_id(0) * 2 * DP + e
    tl.store(part, dk * scale)
    tl.store(part + DP, dv)


@triton.jit
def _query_grad_kernel(
    qkv_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr,
    R, H, W, C, D, WR, WC, HEADS, scale,
    sq_b, sq_t, sq_h, sq_w, sq_c, s_bias, sd_b, sd_t, sd_h, sd_w, sd_c, sg_b, sg_t, sg_h, sg_w, sg_c,
    VIRTUAL: tl.constexpr, IDX64: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ of query block pid1 of window-head pid0 over every key block and the virtual key, into
    the q slots of dqkv_ptr. Pointers and strides as _key_grad_kernel."""
    b, h, r0, c0, cols, n_real, n_pad = _window(tl.program_id(0), R, W, WR, WC, HEADS)
    q0 = tl.program_id(1) * BQ
    if q0 < n_real:
        e = tl.arange(0, DP)
        uq = q0 + tl.arange(0, BQ)
        q, do, lse, delta, q_ok = _query_grad_inputs(
            qkv_ptr, do_ptr, lse_ptr, delta_ptr, b, uq, r0, c0, cols, n_real, R, H, W, h, e, D, HEADS,
            sq_b, sq_t, sq_h, sq_w, sq_c, sd_b, sd_t, sd_h, sd_w, sd_c, IDX64, DOT_DTYPE)  # fmt: skip
        dq = tl.zeros([BQ, DP], ACC_DTYPE)
        for k0 in range(0, n_real, BK):
            k, v, k_ok = _keys(qkv_ptr, b, k0 + tl.arange(0, BK), r0, c0, cols, n_real, H, C, h, e, D,
                               sq_b, sq_t, sq_h, sq_w, sq_c, IDX64, DOT_DTYPE)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC_DTYPE) * scale
            p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if VIRTUAL:
            bk = tl.load(bias_ptr + (C + h * D + e) * s_bias, mask=e < D, other=0.0).to(ACC_DTYPE)
            bv = tl.load(bias_ptr + (2 * C + h * D + e) * s_bias, mask=e < D, other=0.0).to(ACC_DTYPE)
            s_v = _virtual_logit(q, bias_ptr, C + h * D, e, D, n_pad, scale, s_bias, ACC_DTYPE)
            p_v = tl.where(q_ok, tl.exp(s_v - lse), 0.0)
            ds_v = p_v * (tl.sum(do.to(ACC_DTYPE) * bv[None, :], axis=1) - delta)
            dq += ds_v[:, None] * bk[None, :]
        g_offs, _ = _tokens(b, uq, r0, c0, cols, n_real, H, sg_b, sg_t, sg_h, sg_w, IDX64)
        tl.store(dqkv_ptr + g_offs[:, None] + (h * D + e)[None, :] * sg_c, (dq * scale).to(dqkv_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & (e < D)[None, :])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _common_args(g: Geometry, scale: float):
    return (g.rows, g.H, g.W, g.C, g.d, g.wr, g.wc, g.heads, scale)


def _constexprs(t: Tiles, dtype: torch.dtype, *tensors) -> dict:
    dot_dtype, acc_dtype, precision = dot_dtypes(dtype)
    return dict(IDX64=needs_idx64(*tensors), BQ=t.bq, BK=t.bk, DP=t.dp, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
                PRECISION=precision, num_warps=t.num_warps)  # fmt: skip


def _virtual(padding: str, window_size) -> bool:
    """Whether edge windows get the virtual key: "bias" padding of a windowed op (global
    attention has no padding)."""
    return window_size is not None and padding == "bias"


def _bias_arg(qkv: torch.Tensor, qkv_bias):
    """qkv_bias, or zeros (a qkv Linear without bias: the padded tokens are then zero)."""
    return qkv_bias if qkv_bias is not None else qkv.new_zeros(qkv.shape[-1])


def launch_forward(qkv, qkv_bias, out, g: Geometry, scale: float, virtual: bool) -> torch.Tensor:
    """out <- attention of qkv (both [B, T, H, W, .] views, any strides); returns the row lse
    [B, R, W, heads] (accumulate dtype)."""
    t = attention_tiles(g, qkv.dtype)
    lse = torch.empty((g.B, g.rows, g.W, g.heads), dtype=accumulate_dtype(qkv.dtype), device=qkv.device)
    grid = (g.B * g.windows * g.heads, triton.cdiv(g.window_tokens, t.bq))
    _forward_kernel[grid](
        qkv, qkv_bias, out, lse, *_common_args(g, scale), *qkv.stride(), qkv_bias.stride(0), *out.stride(),
        VIRTUAL=virtual, **_constexprs(t, qkv.dtype, qkv, out, lse),
    )  # fmt: skip
    return lse


def forward(qkv, num_heads, window_size, scale, padding, qkv_bias):
    """The ``triton`` forward of ``mixops::window_attention``: out [B, (T,) H, W, C]."""
    g = geometry(qkv, num_heads, window_size)
    out = torch.empty((*qkv.shape[:-1], g.C), dtype=qkv.dtype, device=qkv.device)
    launch_forward(_views(qkv), _bias_arg(qkv, qkv_bias), _views(out), g, scale, _virtual(padding, window_size))
    return out


def backward(grads, needs, qkv, num_heads, window_size, scale, padding, qkv_bias):
    """The ``triton`` backward: the forward recomputed for out and lse, delta = rowsum(dO * out),
    then dK/dV and dQ into one [B, (T,) H, W, 3C] gradient. The bias gradient: zero for q
    (padded queries are cropped), the summed virtual keys' dk, dv for k and v, added over the
    windows in one fixed order (docs/window_attention.md section 2.7); zero with mask padding."""
    need_qkv, need_bias = needs
    g = geometry(qkv, num_heads, window_size)
    t = attention_tiles(g, qkv.dtype)
    virtual = _virtual(padding, window_size)
    bias = _bias_arg(qkv, qkv_bias)
    acc = accumulate_dtype(qkv.dtype)
    qv = _views(qkv)
    out = torch.empty((*qkv.shape[:-1], g.C), dtype=qkv.dtype, device=qkv.device)
    lse = launch_forward(qv, bias, _views(out), g, scale, virtual)
    dout = grads[0]
    delta = (dout.to(acc) * out.to(acc)).reshape(g.B, g.rows, g.W, g.heads, g.d).sum(-1)
    dov = _views(dout)
    programs = g.B * g.windows * g.heads
    common = (*_common_args(g, scale), *qv.stride())
    consts = _constexprs(t, qkv.dtype, qv, dov, lse)
    result = []
    if need_qkv:
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        gv = _views(dqkv)
        consts["IDX64"] = consts["IDX64"] or needs_idx64(gv)
        _key_grad_kernel[(programs, triton.cdiv(g.window_tokens, t.bk))](
            qv, dov, lse, delta, gv, *common, *dov.stride(), *gv.stride(), **consts
        )
        _query_grad_kernel[(programs, triton.cdiv(g.window_tokens, t.bq))](
            qv, bias, dov, lse, delta, gv, *common, bias.stride(0), *dov.stride(), *gv.stride(), VIRTUAL=virtual,
            **consts,
        )  # fmt: skip
        result.append(dqkv)
    if need_bias:
        db = torch.zeros(3, g.heads, g.d, dtype=acc, device=qkv.device)
        if virtual:
            part = torch.empty((programs, 2, t.dp), dtype=acc, device=qkv.device)
            _virtual_key_grad_kernel[(programs,)](
                qv, bias, dov, lse, delta, part, *common, bias.stride(0), *dov.stride(),
                **{k: consts[k] for k in ("IDX64", "BQ", "DP", "DOT_DTYPE", "ACC_DTYPE", "num_warps")},
            )  # fmt: skip
            # the (window, head) partials added over the windows in one fixed order
            sums = column_sum(part.view(g.B * g.windows, g.heads * 2 * t.dp)[None]).view(g.heads, 2, t.dp)
            db[1:] = sums[:, :, : g.d].permute(1, 0, 2)
        result.append(db.reshape(3 * g.C).to(qkv_bias.dtype))
    return result
