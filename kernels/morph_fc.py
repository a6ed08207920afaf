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
# fp32 (fp64 for fp64) partial and torch.sum over the split axis adds them in a fixed order.
#
# FLOPs (numel = M*F = x.numel()): forward 2*numel*F; backward 2*numel*F for dX plus 2*numel*F
# for dW.
# Minimal HBM bytes (e = element size): forward 2*numel*e + F*F*e (read x, write y, read W);
# backward dX 2*numel*e + F*F*e, dW/db 2*numel*e + F*(F+1)*e (read dY and x, write dW, db).
# The deterministic reduction adds SPLIT*F*(F+1)*4 bytes of fp32 partials, written and re-read.
#
# Grids: forward / dX GEMM: (cdiv(M, BLOCK_M) * cdiv(F, BLOCK_N),), with the F tiles of one row
# block adjacent so its gathered rows are re-read from L2; dW/db: (cdiv(F, BLOCK_N) *
# cdiv(F, BLOCK_F), SPLIT).
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# the AXIS constexpr of the kernels; "w" is the default branch of _element_offsets
_AXIS_IDS = {"w": 0, "h": 1, "hs": 2, "t": 3}
_AXIS_H = tl.constexpr(_AXIS_IDS["h"])
_AXIS_HS = tl.constexpr(_AXIS_IDS["hs"])
_AXIS_T = tl.constexpr(_AXIS_IDS["t"])


@triton.jit
def _element_offsets(rows, feats, T, H, W, L, D, NCH, s_b, s_t, s_h, s_w, s_c, AXIS: tl.constexpr):
    """int64 offsets of GEMM elements (rows, feats) in a strided [B, T, H, W, C] tensor.

    rows (int64) and feats (int32) are broadcastable tensors, e.g. rows[:, None] and
    feats[None, :] for a [rows, feats] tile or the other way round for its transpose. L is the
    chunk length (spatial) or the group count G ("t"), D the channels per group, NCH = H*W/L
    the chunks per frame; s_* are the tensor's strides in elements.

    Spatial axes: the token sequence index is a row part plus a feature part (w, h: k*L + p;
    hs: k + p*NCH). Both parts are split into (outer, inner) digits of the radix R of the
    sequence (W row-major, H column-major) on their own -- 1-D work, and the loop-invariant
    side is hoisted out of the K / M loops by the compiler -- and the 2-D tile only adds them
    with one carry, instead of dividing every element by R.
    """
    g = rows % L
    r = rows // L
    if AXIS == _AXIS_T:
        w = r % W
        r = r // W
        h = r % H
        b = r // H
        t = feats // D
        s = feats % D
        row_off = b * s_b + h * s_h + w * s_w + g * D * s_c
        offs = row_off + t.to(tl.int64) * s_t + s.to(tl.int64) * s_c
    else:
        k = (r % NCH).to(tl.int32)
        r = r // NCH
        t = r % T
        b = r // T
        p = feats // D
        s = feats % D
        if AXIS == _AXIS_HS:
            seq_row = k
            seq_feat = p * NCH
        else:
            seq_row = k * L
            seq_feat = p
        if AXIS == _AXIS_H:
            R = H
            s_out = s_w
            s_in = s_h
        else:
            R = W
            s_out = s_h
            s_in = s_w
        row_in = seq_row % R
        feat_in = seq_feat % R
        row_off = b * s_b + t * s_t + g * D * s_c + (seq_row // R).to(tl.int64) * s_out + row_in.to(tl.int64) * s_in
        feat_off = (seq_feat // R).to(tl.int64) * s_out + feat_in.to(tl.int64) * s_in + s.to(tl.int64) * s_c
        # the inner digits sum to < 2R: a carry is one outer step forward and R inner steps back
        carry = ((row_in + feat_in) >= R).to(tl.int64)
        offs = row_off + feat_off + carry * s_out - (carry * R) * s_in
    return offs


@triton.jit
def _gathered_gemm_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, F, T, H, W, L, D, NCH,
    sa_b, sa_t, sa_h, sa_w, sa_c,
    sb_k, sb_n, s_bias,
    sc_b, sc_t, sc_h, sc_w, sc_c,
    AXIS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """C_g[m, n] = sum_f A_g[m, f] * B[f, n] (+ bias[n]), A_g / C_g gathered / scattered.

    a_ptr:    [B, T, H, W, C] input of the map (x forward, dY for dX), strides sa_b..sa_c
    b_ptr:    [F, F] matrix read as B[f, n] = b_ptr[f*sb_k + n*sb_n] (W^T forward, W for dX)
    bias_ptr: [F] bias indexed by GEMM feature, stride s_bias (unused unless HAS_BIAS)
    c_ptr:    [B, T, H, W, C] output (y forward, dX backward), strides sc_b..sc_c
    M, F: GEMM rows and features; T, H, W, L, D, NCH: the map (see _element_offsets).
    DOT_DTYPE: what the operands enter tl.dot as (storage dtype on the GPU, fp32 for half types
    under the interpreter, whose bf16 dot is wrong); ACC_DTYPE fp32, or fp64 for fp64 inputs.
    """
    tl.static_assert(BLOCK_K >= 16)
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid = tl.program_id(0)
    num_n = tl.cdiv(F, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < F
        a_offs = _element_offsets(rows[:, None], ks[None, :], T, H, W, L, D, NCH, sa_b, sa_t, sa_h, sa_w, sa_c, AXIS)
        a = tl.load(a_ptr + a_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * sb_k + cols[None, :] * sb_n, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * s_bias, mask=col_ok, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    c_offs = _element_offsets(rows[:, None], cols[None, :], T, H, W, L, D, NCH, sc_b, sc_t, sc_h, sc_w, sc_c, AXIS)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_weight_kernel(
    dy_ptr, x_ptr, dw_ptr, db_ptr,
    M, F, T, H, W, L, D, NCH, ROWS_PER_SPLIT,
    sy_b, sy_t, sy_h, sy_w, sy_c,
    sx_b, sx_t, sx_h, sx_w, sx_c,
    sdw_s, sdw_n, sdw_f, sdb_s, sdb_n,
    AXIS: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Split-M partials of dW = dY_g^T @ X_g and db = colsum(dY_g).

    dy_ptr: [B, T, H, W, C] incoming gradient (may be expanded), strides sy_b..sy_c
    x_ptr:  [B, T, H, W, C] forward input, strides sx_b..sx_c (unused unless HAS_DW)
    dw_ptr: [SPLIT, F, F] partials, dw[s, n, f] at s*sdw_s + n*sdw_n + f*sdw_f (if HAS_DW)
    db_ptr: [SPLIT, F] partials, db[s, n] at s*sdb_s + n*sdb_n (if HAS_DB; written by the
            programs of the first F tile only)
    Program (pid, split) covers GEMM rows [split*ROWS_PER_SPLIT, (split+1)*ROWS_PER_SPLIT) of
    the output tile (pid // cdiv(F, BLOCK_F), pid % cdiv(F, BLOCK_F)); the reduction axis of
    its dot is BLOCK_M rows.
    """
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_F >= 16)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_f = tl.cdiv(F, BLOCK_F) if HAS_DW else 1
    pid_n = pid // num_f
    pid_f = pid % num_f
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    n_ok = ns < F
    f_ok = fs < F
    start = split.to(tl.int64) * ROWS_PER_SPLIT
    end = tl.minimum(start + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=ACC_DTYPE)
    db_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < end
        dy_offs = _element_offsets(ms[None, :], ns[:, None], T, H, W, L, D, NCH, sy_b, sy_t, sy_h, sy_w, sy_c, AXIS)
        dy_t = tl.load(dy_ptr + dy_offs, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        if HAS_DW:
            x_offs = _element_offsets(ms[:, None], fs[None, :], T, H, W, L, D, NCH, sx_b, sx_t, sx_h, sx_w, sx_c, AXIS)
            xg = tl.load(x_ptr + x_offs, mask=m_ok[:, None] & f_ok[None, :], other=0.0)
            acc = tl.dot(dy_t.to(DOT_DTYPE), xg.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        if HAS_DB:
            db_acc += tl.sum(dy_t.to(ACC_DTYPE), axis=1)
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
    """The gather map of one call: GEMM size (M, F) and the map's integer parameters."""

    axis: int
    M: int
    F: int
    T: int
    H: int
    W: int
    L: int
    D: int
    NCH: int

    @property
    def args(self) -> tuple[int, ...]:
        return (self.M, self.F, self.T, self.H, self.W, self.L, self.D, self.NCH)


def geometry(shape5: tuple[int, ...], segment_dim: int, axis: str) -> Geometry:
    """The map for x of shape [B, T, H, W, C] (validated by mixops.ops.morph_fc)."""
    B, T, H, W, C = shape5
    D = C // segment_dim
    if axis == "t":
        return Geometry(_AXIS_IDS[axis], B * H * W * segment_dim, T * D, T, H, W, segment_dim, D, 1)
    return Geometry(_AXIS_IDS[axis], B * T * H * W, C, T, H, W, segment_dim, D, H * W // segment_dim)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one kernel launch."""

    m: int
    n: int
    k: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_between(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _interpreter_blocks(M: int, F: int) -> Blocks:
    """Under the interpreter every program and loop step costs ~1 ms whatever its size (numpy
    does the tile work): one tile over F (up to 256) and as many rows as keep a tile <= 64k
    elements, so the test shapes run in a handful of programs."""
    nf = _pow2_between(F, 16, 256)
    return Blocks(m=_pow2_between(M, 16, max(16, 65536 // nf)), n=nf, k=nf, num_warps=4, num_stages=1)


def gemm_blocks(M: int, F: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the gathered GEMM (forward and dX): m = BLOCK_M rows, n = BLOCK_N features,
    k = BLOCK_K reduction step. Half types use tensor-core tiles that cover the MorphMLP widths
    (F = 112..784) in one or a few N tiles; fp32 and fp64 use smaller tiles for registers."""
    if _interpreting():
        return _interpreter_blocks(M, F)
    if dtype == torch.float64:
        return Blocks(m=64, n=32, k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(m=64, n=64, k=32, num_warps=4, num_stages=3)
    if F <= 64:
        return Blocks(m=128, n=64, k=32, num_warps=4, num_stages=3)
    return Blocks(m=128, n=128, k=32, num_warps=8, num_stages=3)


def grad_weight_blocks(M: int, F: int, dtype: torch.dtype) -> Blocks:
    """Tiles of the dW/db kernel: m = BLOCK_N (dW rows), n = BLOCK_F (dW columns), k = BLOCK_M
    (the GEMM rows reduced per step)."""
    if _interpreting():
        b = _interpreter_blocks(M, F)
        return Blocks(m=b.n, n=b.n, k=b.m, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return Blocks(m=32, n=32, k=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return Blocks(m=64, n=64, k=32, num_warps=4, num_stages=3)
    return Blocks(m=128, n=128, k=32, num_warps=8, num_stages=3)


def grad_weight_split(M: int, F: int, blocks: Blocks, device: torch.device) -> int:
    """How many fixed row ranges dW/db is split into: enough programs to fill the GPU about
    twice (a function of the shape and the device only, so the sum is reproducible); one under
    the interpreter, where programs are what costs."""
    if _interpreting() or device.type != "cuda":
        return 1
    tiles = triton.cdiv(F, blocks.m) * triton.cdiv(F, blocks.n)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(target // tiles, triton.cdiv(M, blocks.k), 1024))


def _tf32_allowed() -> bool:
    """Whether PyTorch's own fp32 matmuls may use TF32, so the drop-in matches the official op
    under the same settings. ``fp32_precision`` (torch >= 2.9) follows the legacy flags and the
    global setting too, and reading the legacy flags raises once the new API was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def _dot_dtypes(dtype: torch.dtype):
    """(DOT_DTYPE, ACC_DTYPE, PRECISION) for storage dtype ``dtype``."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, tl.float32, "tf32" if _tf32_allowed() else "ieee"
    if _interpreting():
        return tl.float32, tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), tl.float32, "ieee"


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def launch_gemm(
    a5: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out5: torch.Tensor,
    geo: Geometry,
    transpose_weight: bool,
) -> None:
    """out5 <- scatter(gather(a5) @ (weight^T if transpose_weight else weight) (+ bias)).

    a5, out5: [B, T, H, W, C] of any strides (out5 must not overlap itself); weight [F, F].
    """
    if geo.M == 0:
        return
    blocks = gemm_blocks(geo.M, geo.F, a5.dtype)
    dot_dtype, acc_dtype, precision = _dot_dtypes(a5.dtype)
    sb_k, sb_n = (weight.stride(1), weight.stride(0)) if transpose_weight else weight.stride()
    grid = (triton.cdiv(geo.M, blocks.m) * triton.cdiv(geo.F, blocks.n),)
    _gathered_gemm_kernel[grid](
        a5, weight, bias if bias is not None else weight, out5,
        *geo.args,
        *a5.stride(),
        sb_k, sb_n, bias.stride(0) if bias is not None else 0,
        *out5.stride(),
        AXIS=geo.axis, HAS_BIAS=bias is not None,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


def launch_grad_weight(
    dy5: torch.Tensor,
    x5: torch.Tensor,
    geo: Geometry,
    dw_part: Optional[torch.Tensor],
    db_part: Optional[torch.Tensor],
) -> None:
    """Fill the split partials dw_part [SPLIT, F, F] and/or db_part [SPLIT, F] (any strides;
    SPLIT from their first dimension) from dY and x, both [B, T, H, W, C] of any strides."""
    part = dw_part if dw_part is not None else db_part
    split = part.shape[0]
    blocks = grad_weight_blocks(geo.M, geo.F, dy5.dtype)
    dot_dtype, acc_dtype, precision = _dot_dtypes(dy5.dtype)
    rows_per_split = triton.cdiv(triton.cdiv(geo.M, split), blocks.k) * blocks.k
    num_f = triton.cdiv(geo.F, blocks.n) if dw_part is not None else 1
    grid = (triton.cdiv(geo.F, blocks.m) * num_f, split)
    _grad_weight_kernel[grid](
        dy5, x5, part if dw_part is None else dw_part, part if db_part is None else db_part,
        *geo.args, rows_per_split,
        *dy5.stride(),
        *x5.stride(),
        *(dw_part.stride() if dw_part is not None else (0, 0, 0)),
        *(db_part.stride() if db_part is not None else (0, 0)),
        AXIS=geo.axis, HAS_DW=dw_part is not None, HAS_DB=db_part is not None,
        BLOCK_N=blocks.m, BLOCK_F=blocks.n, BLOCK_M=blocks.k,
        DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Registry entry points (mixops.backend.register("morph_fc", "triton", ...))
# ---------------------------------------------------------------------------------------------


def _as_video(t: torch.Tensor) -> torch.Tensor:
    # [B, H, W, C] is a clip of one frame: a view, strides kept
    return t if t.dim() == 5 else t.unsqueeze(1)


def forward(x, weight, bias, segment_dim, axis):
    """The ``triton`` forward of ``mixops::morph_fc``: a fresh contiguous tensor of x's shape."""
    x5 = _as_video(x)
    out = torch.empty(x5.shape, dtype=x.dtype, device=x.device)
    launch_gemm(x5, weight, bias, out, geometry(tuple(x5.shape), segment_dim, axis), transpose_weight=True)
    return out.reshape(x.shape)


def backward(grads, needs, x, weight, bias, segment_dim, axis):
    """The ``triton`` backward: gradients of the flagged inputs among (x, weight, bias)."""
    need_x, need_w, need_b = needs
    x5 = _as_video(x)
    dy5 = _as_video(grads[0])
    geo = geometry(tuple(x5.shape), segment_dim, axis)
    result = []
    if need_x:
        dx = torch.empty(x5.shape, dtype=x.dtype, device=x.device)
        launch_gemm(dy5, weight, None, dx, geo, transpose_weight=False)
        result.append(dx.reshape(x.shape))
    if need_w or need_b:
        part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        blocks = grad_weight_blocks(geo.M, geo.F, x.dtype)
        split = grad_weight_split(geo.M, geo.F, blocks, x.device)
        dw_part = torch.empty((split, geo.F, geo.F), dtype=part_dtype, device=x.device) if need_w else None
        db_part = torch.empty((split, geo.F), dtype=part_dtype, device=x.device) if need_b else None
        launch_grad_weight(dy5, x5, geo, dw_part, db_part)
        if need_w:
            result.append(dw_part.sum(dim=0).to(weight.dtype))
        if need_b:
            result.append(db_part.sum(dim=0).to(bias.dtype))
    return result
