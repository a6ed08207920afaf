# The weight and bias gradients of a Linear whose output gradient a family kernel has already
# formed: dW = g^T x and db = sum_m g over all rows m, with deterministic fixed-order partials
# (a family's own dW kernel gathers its operands; this one reads two plain [M, ·] matrices).
# Used by DynaMixer's compress Linear, whose output gradient dr the fused mixing backward
# writes (kernels/dynamixer.py).
#
# FLOPs 2*M*O*I. HBM bytes: g and x read once per (O, I) tile column / row (O and I are small in
# its uses: one tile along O), plus SPLIT*O*I*a of partials written and re-read (a = 4 or 8).
# Grid (cdiv(O, BLOCK_O) * cdiv(I, BLOCK_I), SPLIT): program (tile, s) sums the rows
# [s*ROWS, (s+1)*ROWS) in BLOCK_M steps; column_sum then adds the SPLIT partials in one fixed
# order, SPLIT from deterministic_split (the shapes alone decide).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    accumulate_dtype,
    column_sum,
    deterministic_split,
    dot_dtypes,
    interpreter_gemm_blocks,
    interpreting,
    needs_idx64,
    pow2_between,
    strides,
)


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, out_ptr,
    M, T, O, I, ROWS,
    sg_b, sg_t, sg_o, sx_b, sx_t, sx_i, so_s, so_o, so_i,
    IDX64: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[s, o, i] = sum of g[m, o] * x[m, i] over the rows m of range s, in row order.

    g_ptr:   [B, T, O] output gradient, strides sg_b, sg_t, sg_o
    x_ptr:   [B, T, I] Linear input, strides sx_b, sx_t, sx_i
    out_ptr: [SPLIT, O, I] partials in ACC_DTYPE, strides so_s, so_o, so_i
    Row m is (m // T, m % T), M = B*T (two row strides: a token view such as [B', N, C] with a
    channel slice needs no copy). ROWS: rows per range, a multiple of BLOCK_M. IDX64: int64
    row offsets (host-chosen).
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    num_i = tl.cdiv(I, BLOCK_I)
    o = (pid // num_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (pid % num_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    if IDX64:
        s = s.to(tl.int64)
    start = s * ROWS
    stop = tl.minimum(start + ROWS, M)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC_DTYPE)
    for m0 in range(start, stop, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < stop
        b = m // T
        t = m % T
        g = tl.load(g_ptr + (b * sg_b + t * sg_t)[:, None] + o[None, :] * sg_o, mask=m_ok[:, None] & (o < O)[None, :],
                    other=0.0)  # fmt: skip
        x = tl.load(x_ptr + (b * sx_b + t * sx_t)[:, None] + i[None, :] * sx_i, mask=m_ok[:, None] & (i < I)[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    tl.store(out_ptr + s * so_s + o[:, None] * so_o + i[None, :] * so_i, acc, mask=(o < O)[:, None] & (i < I)[None, :])


def weight_grad_blocks(M: int, O: int, I: int) -> tuple[int, int, int]:
    """(BLOCK_O, BLOCK_I, BLOCK_M): on a GPU an output tile of up to 2048 values (16 x 128 to
    64 x 32; O is small in its uses) fed 16 rows a step: an IEEE fp32 tl.dot is FMAs unrolled
    over the step, and 64 rows spilled 732 bytes at 255 registers on sm_90 (16 take 122), a
    64 x 128 tile 1880 bytes; under the interpreter the whole problem in as
    few programs and steps as interpreter_gemm_blocks gives."""
    if interpreting():
        b = interpreter_gemm_blocks(O, I, M)
        return b.m, b.n, b.k
    block_o = pow2_between(O, 16, 64)
    return block_o, pow2_between(I, 16, max(16, 2048 // block_o)), 16


def linear_param_grads(g: torch.Tensor, x: torch.Tensor, need_w: bool, need_b: bool) -> list[torch.Tensor]:
    """[dW [O, I]] and/or [db [O]] (in that order, as asked) of a Linear with input x [B, T, I]
    and output gradient g [B, T, O] (any strides, any float dtypes), in accumulate_dtype of the
    wider of the two; bit-identical on every GPU model."""
    B, T, O = g.shape
    I = x.shape[-1]
    M = B * T
    acc = accumulate_dtype(torch.promote_types(g.dtype, x.dtype))
    out = []
    if need_w:
        dw = torch.zeros((O, I), dtype=acc, device=g.device)
        if M > 0:
            block_o, block_i, block_m = weight_grad_blocks(M, O, I)
            tiles = triton.cdiv(O, block_o) * triton.cdiv(I, block_i)
            split = deterministic_split(M, block_m, tiles)
            rows = triton.cdiv(triton.cdiv(M, split), block_m) * block_m
            split = triton.cdiv(M, rows)  # no empty range
            part = dw[None] if split == 1 else torch.empty((split, O, I), dtype=acc, device=g.device)
            dot_dtype, acc_dtype, precision = dot_dtypes(acc)
            _weight_grad_kernel[(tiles, split)](
                g, x, part, M, T, O, I, rows, *strides(g), *strides(x), *strides(part),
                IDX64=needs_idx64(g, x, part), BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_M=block_m,
                DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype, PRECISION=precision,
            )  # fmt: skip
            if split > 1:
                dw = column_sum(part.view(1, split, O * I)).view(O, I)
        out.append(dw)
    if need_b:
        out.append(column_sum(g.reshape(1, M, O)).view(O).to(acc))
    return out
