# What every Triton family of mixops needs, written once: the interpreter switch, the dtype rules
# of the GEMMs and reductions, launch configurations, the program-id -> output-tile map, the
# int32/int64 offset rule, the host-checked vector hints and the deterministic split rule. A
# family file imports from here and never from another family's module.
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# interpreting(): under TRITON_INTERPRET=1 every program and loop step costs ~1 ms whatever its
# size, so launch configurations take few large tiles there
from ..backend import interpreting  # noqa: F401  (re-exported for the family files)

# ---------------------------------------------------------------------------------------------
# dtype rules
# ---------------------------------------------------------------------------------------------


def tf32_allowed() -> bool:
    """Whether PyTorch's own fp32 matmuls may use TF32, so a drop-in matches the official op
    under the same settings. ``fp32_precision`` (torch >= 2.9) follows the legacy flags and the
    global setting too, and reading the legacy flags raises once the new API was used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of accumulators, partial sums and statistics for storage ``dtype``:
    fp64 for fp64 (gradcheck), fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(dtype: torch.dtype):
    """accumulate_dtype as the tl dtype a kernel's elementwise math runs in (COMPUTE)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_dtypes(dtype: torch.dtype):
    """(DOT_DTYPE, ACC_DTYPE, PRECISION) of a tl.dot over operands stored as ``dtype``: fp64
    exact; fp32 in IEEE fp32 unless torch allows TF32; fp16/bf16 in their dtype with fp32
    accumulation on a GPU, upcast to fp32 under the interpreter (its bf16 dot is wrong)."""
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, tl.float32, "tf32" if tf32_allowed() else "ieee"
    if interpreting():
        return tl.float32, tl.float32, "ieee"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), tl.float32, "ieee"


# ---------------------------------------------------------------------------------------------
# Launch configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one GEMM-shaped launch: m x n output tile, k the
    reduction step (each kernel's docstring says which of its axes they name)."""

    m: int
    n: int
    k: int
    num_warps: int
    num_stages: int


def pow2_between(n: int, lo: int, hi: int) -> int:
    """The next power of 2 >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def pow2_floor(n: int) -> int:
    """The largest power of 2 <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def interpreter_gemm_blocks(M: int, N: int, K: int) -> Blocks:
    """The tiles every GEMM takes under the interpreter, where programs and loop steps are what
    costs: the whole reduction (up to 256) in one step, up to 256 columns, and as many rows as
    keep a tile <= 64K elements, so the test shapes run in a handful of programs."""
    n = pow2_between(N, 16, 256)
    k = pow2_between(K, 16, 256)
    return Blocks(m=pow2_between(M, 16, max(16, 65536 // max(n, k))), n=n, k=k, num_warps=4, num_stages=1)


# Deterministic reductions split a long axis into fixed ranges, each program writing one partial
# that column_sum (below) adds up in a fixed order -- never an ATen sum, whose CUDA split of one
# output across CTAs follows the SM count. The number of ranges is a function of the shapes alone,
# so gradients are bit-identical on every GPU model (not only from run to run): enough programs
# to fill ~2 waves of a 132-SM H100, whichever GPU runs it.
SPLIT_TARGET_PROGRAMS = 256


def deterministic_split(length: int, step: int, tiles: int) -> int:
    """How many fixed ranges a reduction over ``length`` rows (consumed ``step`` rows at a
    time) is split into when ``tiles`` programs already cover the output: the shapes alone
    decide, never the device. One range under the interpreter, where programs are what costs."""
    if interpreting():
        return 1
    return max(1, min(SPLIT_TARGET_PROGRAMS // max(tiles, 1), triton.cdiv(max(length, 1), step), 1024))


# ---------------------------------------------------------------------------------------------
# Offsets and vector widths
# ---------------------------------------------------------------------------------------------

# int32 offsets are safe below this extent: a kernel may add two offsets of one tensor before
# masking (e.g. the carry-free row + feature sum of a gathered tile), which stays below 2**31
INT32_EXTENT = 2**30


def strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides with those of size-1 dimensions zeroed: they are never used, and a huge one
    (as torch gives expanded or sliced views) would only push the offsets to int64."""
    return tuple(s if n > 1 else 0 for n, s in zip(t.shape, t.stride()))


def needs_idx64(*tensors: torch.Tensor | None) -> bool:
    """Whether any tensor's largest element offset needs int64 arithmetic (a kernel's IDX64)."""
    return any(
        t is not None and sum((n - 1) * s for n, s in zip(t.shape, strides(t))) >= INT32_EXTENT for t in tensors
    )


def vector_width(t: torch.Tensor, dim: int, *extents: int) -> int:
    """The elements per vector a kernel may promise the compiler along ``dim`` of ``t``
    (vector_hint): the largest power of 2, at most 16 bytes, that divides every other stride of
    t, its element address and each of ``extents`` (the lengths of the contiguous runs along dim
    and the bound its mask compares with), given a unit stride along dim; 1 otherwise. The JIT
    itself only learns an int argument's divisibility by 16, so a row stride like 392 (784
    bytes, a multiple of 16) would otherwise leave 2-byte loads."""
    st = strides(t)
    dim %= t.dim()
    if t.shape[dim] > 1 and st[dim] != 1:
        return 1
    vec = 16 // t.element_size()
    for n in (*extents, *st[:dim], *st[dim + 1 :], t.data_ptr() // t.element_size()):
        while n % vec:
            vec //= 2
    return vec


def weight_operand(weight: torch.Tensor, transpose_weight: bool, extent: int) -> tuple[int, int, int, int]:
    """(sb_k, sb_n, VEC_B, DIM_B) of a GEMM operand B[k, n] = weight[n, k] (transposed) or
    weight[k, n] of a 2-D weight whose tiles are masked at ``extent`` along both dimensions (F
    of a square [F, F] weight; hw of one share-set's [hw, hw] block of RepMLP's [S*hw, hw]):
    its strides and its vector hint along the tile dimension whose stride is 1. The JIT knows
    only that a stride is a multiple of 16 elements; vector_width checks the 16-byte multiple
    itself, so at F = 392 (MorphMLP stage 3) bf16 and fp32 rows still move as 16-byte cp.async
    copies rather than 2- / 4-byte ones (tests/test_morph_fc_sm90.py)."""
    weight_dim = (1, 0) if transpose_weight else (0, 1)  # weight's dimension of B's k and n
    sb_k, sb_n = (weight.stride(d) for d in weight_dim)
    dim_b = 0 if sb_k == 1 else 1
    return sb_k, sb_n, vector_width(weight, weight_dim[dim_b], extent), dim_b


@triton.jit
def vector_hint(base, offs, VEC: tl.constexpr, DIM: tl.constexpr):
    """base + offs, telling the compiler what the host checked (vector_width): along dimension
    DIM of the 2-D pointer tile, aligned runs of VEC elements are contiguous and start
    VEC-element aligned, so the tile moves as VEC-wide vectors (16-byte cp.async on sm_90). On
    pointers, not offsets: hints on the offset arithmetic do not survive canonicalization (and a
    hint needs the op that makes the value, so the add happens here); pointer divisibility is in
    bytes."""
    ptrs = base + offs
    if VEC > 1:
        ALIGN: tl.constexpr = VEC * (base.dtype.element_ty.primitive_bitwidth // 8)
        if DIM == 1:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, ALIGN]), [1, VEC])
        else:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [ALIGN, 1]), [VEC, 1])
    return ptrs


@triton.jit
def vector_mask(ok0, ok1, VEC: tl.constexpr, DIM: tl.constexpr):
    """The mask ok0[:, None] & ok1[None, :] of a vector_hint tile, telling the compiler it is
    constant over each VEC-element vector along DIM, as the host checked (vector_width: VEC
    divides the bound the mask compares with). The JIT knows an int argument's divisibility only
    by 16, so a bound like 196 or 392 would otherwise cut every vector into masked scalars -- and
    a 2-byte load cannot become a pipelined cp.async copy at all. The & happens here because a
    hint attaches to the op that makes the value (on a function argument it is dropped)."""
    mask = ok0[:, None] & ok1[None, :]
    if VEC > 1:
        if DIM == 1:
            mask = tl.max_constancy(mask, [1, VEC])
        else:
            mask = tl.max_constancy(mask, [VEC, 1])
    return mask


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IDX64: tl.constexpr):
    """This program's tile of an [M, N] output: (pid_m, pid_n, rows, cols, row mask, col mask).
    The N tiles of one row block are adjacent program ids, so a row block's gathered operand is
    re-read from L2 rather than HBM. Rows are int64 when IDX64."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if IDX64:
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, rows, cols, rows < M, cols < N


# ---------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def _input_device(args) -> torch.device | None:
    """The CUDA device an entry point's launches belong on: that of its first tensor argument
    (searching into lists, e.g. a backward's grads), or None when it is not a CUDA tensor."""
    t = _first_tensor(args)
    return t.device if t is not None and t.device.type == "cuda" else None


def on_input_device(fn):
    """``fn`` run with its first tensor argument's CUDA device current. A Triton launch uses
    the current device and its current stream, so without this guard tensors on cuda:1 while
    cuda:0 is current would be read by a kernel on the wrong GPU (an illegal address). Every
    Triton entry point is registered through it (mixops/ops/triton_backend.py)."""

    @functools.wraps(fn)
    def guarded(*args):
        device = _input_device(args)
        if device is None:
            return fn(*args)
        with torch.cuda.device(device):
            return fn(*args)

    return guarded


# ---------------------------------------------------------------------------------------------
# Deterministic column sums
# ---------------------------------------------------------------------------------------------
#
# out[b, n] = sum over m of x[b, m, n] for a [B, M, N] view of any strides, with no ATen
# reduction anywhere: ATen's CUDA sum (setReduceConfig) splits one output across several CTAs
# by the SM count once an output has many values, so its bits would depend on the GPU model.
# Pass 1 splits M into deterministic_split fixed row ranges, each program writing one fp32
# (fp64 for fp64) partial [SPLIT, B, N]; pass 2 is the same kernel over those partials with a
# single range, so they are added in one fixed order. One pass when the split is 1 (always
# under the interpreter, and when B·N alone fills the GPU).
# Minimal HBM traffic (e = element size, a = 4 or 8 the accumulator size): B·M·N·e read and
# B·N·a written; the split adds SPLIT·B·N·a written and re-read (SPLIT <= 256 / tiles, so at
# most 256 column tiles' worth of partials).
# Grid (B · cdiv(N, BLOCK_N), SPLIT); program (b, column block, s) sums rows
# [s·ROWS, (s+1)·ROWS) BLOCK_M at a time in registers and reduces over the rows once at the end.


@triton.jit
def _column_sum_kernel(
    x_ptr, out_ptr,
    M, N, ROWS,
    sx_b, sx_m, sx_n,
    so_s, so_b, so_n,
    COMPUTE: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[s, b, n] = sum of x[b, m, n] over the rows m in [s·ROWS, min((s+1)·ROWS, M)), in
    COMPUTE, summed in a fixed order (BLOCK_M-row steps, then one tl.sum over the tile rows).

    x_ptr   [B, M, N] input, any dtype and strides: sx_b, sx_m, sx_n (elements).
    out_ptr [SPLIT, B, N] partials in COMPUTE: so_s, so_b, so_n (SPLIT = grid dim 1).
    ROWS: rows per range, a multiple of BLOCK_M. IDX64: element offsets in int64.
    Program (pid 0 = b · cdiv(N, BLOCK_N) + column block, pid 1 = s).
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    b = pid // num_n
    cols = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    if IDX64:
        b = b.to(tl.int64)
        cols = cols.to(tl.int64)
        s = s.to(tl.int64)
    start = s * ROWS
    stop = tl.minimum(start + ROWS, M)
    base = x_ptr + b * sx_b + cols[None, :] * sx_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for m0 in range(start, stop, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < stop)[:, None] & c_ok[None, :]
        acc += tl.load(base + rows[:, None] * sx_m, mask=mask, other=0.0).to(COMPUTE)
    tl.store(out_ptr + s * so_s + b * so_b + cols * so_n, tl.sum(acc, axis=0), mask=c_ok)


def column_sum_blocks(M: int, N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of _column_sum_kernel: up to 64 columns (256 bytes of an fp32 row)
    by up to 32 rows on a GPU, 2048 accumulators (16 per thread at 4 warps); under the
    interpreter (~1 ms per program and per step) tiles of up to 16K elements."""
    block_n = pow2_between(N, 16, 64)
    limit = 16384 if interpreting() else 2048
    return pow2_between(M, 1, limit // block_n), block_n


def _range_rows(M: int, split: int, block_m: int) -> int:
    """Rows per range when M rows are cut into ``split`` ranges of whole BLOCK_M steps."""
    return triton.cdiv(triton.cdiv(max(M, 1), split), block_m) * block_m


def column_sum_split(B: int, M: int, N: int) -> int:
    """How many fixed row ranges column_sum's first pass cuts M into: deterministic_split over
    the B · cdiv(N, BLOCK_N) column tiles, less any range that would be empty -- the shape
    alone decides, never the device."""
    block_m, block_n = column_sum_blocks(M, N)
    split = deterministic_split(M, block_m, B * triton.cdiv(N, block_n))
    return triton.cdiv(max(M, 1), _range_rows(M, split, block_m))


def _launch_column_sum(x: torch.Tensor, out: torch.Tensor, split: int) -> None:
    """Fill out [split, B, N] with the partials of x [B, M, N] over ``split`` row ranges."""
    B, M, N = x.shape
    block_m, block_n = column_sum_blocks(M, N)
    rows = _range_rows(M, split, block_m)
    _column_sum_kernel[(B * triton.cdiv(N, block_n), split)](
        x, out,
        M, N, rows,
        *strides(x), *strides(out),
        COMPUTE=compute_dtype(x.dtype),
        IDX64=needs_idx64(x, out),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
    )  # fmt: skip


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """[B, N] = x.sum(dim=1) of a [B, M, N] tensor (any strides, expanded views included) in
    accumulate_dtype(x.dtype), with the same bits on every GPU model: column_sum_split fixed
    row ranges, then their partials added in a fixed order (see the header above)."""
    if x.dim() != 3:
        raise ValueError(f"column_sum: x must be [B, M, N], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"column_sum: x must be a floating-point tensor, got {x.dtype}")
    B, M, N = x.shape
    acc = accumulate_dtype(x.dtype)
    out = torch.zeros((B, N), dtype=acc, device=x.device)
    if B * N == 0 or M == 0:
        return out
    split = column_sum_split(B, M, N)
    if split == 1:
        _launch_column_sum(x, out[None], 1)
        return out
    part = torch.empty((split, B, N), dtype=acc, device=x.device)
    _launch_column_sum(x, part, split)
    _launch_column_sum(part.permute(1, 0, 2), out[None], 1)
    return out
