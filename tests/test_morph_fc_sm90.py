"""sm_90 builds of the MorphFC Triton kernels, no GPU needed: every launch the launchers make
at the official shapes is intercepted, compiled for sm_90 with exactly the argument
specialization a real launch gets (ints equal to 1 as constants, 16-divisibility of ints and
pointers), and its register use and spills read from ``ptxas -v``. The tests assert no spills
and vector-wide gathered and weight loads; run this file as a script for the table.

Compiling needs the kernels decorated without TRITON_INTERPRET, so the pytest side runs this
file in a child process (``python tests/test_morph_fc_sm90.py``).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import sm90_compile

# (axis, x shape [B, T, H, W, C], segment_dim): every axis once, D = 8, 12, 14, 16 and the
# channel FC (D = C) among them -- MorphMLP-S / -T stages (docs/morph_fc.md section 10), B = 1;
# F = 392 (MorphMLP-S stage 3, spatial and temporal), whose weight rows the JIT does not see
# 16-byte aligned. Each case costs three sm_90 compiles (~5 s each on 2 cores).
SHAPES = [
    ("w", (1, 1, 56, 56, 112), 14), ("h", (1, 1, 14, 14, 336), 28), ("hs", (1, 1, 7, 7, 784), 49),
    ("t", (1, 8, 14, 14, 392), 8), ("c", (1, 1, 7, 7, 784), 1), ("w", (1, 1, 14, 14, 392), 28),
]  # fmt: skip
# (x shape, K): the reweighted proj of MorphFC_S stage 1 (three branches), MorphFC_S2 stage 4
# (two) and MorphFC_S stage 3 at T = 8 (F = 392); alpha read per item (stage 1), per element
# (stage 4 image: 49 rows per item) and per item with two items per 64-row tile (stage 3, T = 8);
# three compiles each (forward, dA, dW)
PROJ_SHAPES = [((1, 1, 56, 56, 112), 3), ((1, 1, 7, 7, 784), 2), ((1, 8, 14, 14, 392), 3)]
DTYPES = ("float32", "float16", "bfloat16")


def _launches():
    """(label, kernel, args, kwargs) of every launch the launchers make at SHAPES x DTYPES:
    forward with the mean partials, dX with the mean gradient, dW/db with it; for the
    reweighted proj its forward, dA (both epilogue outputs) and dW/db."""
    import torch
    from mixops.kernels import morph_fc as K
    from mixops.kernels import morph_fc_proj as P

    calls = []

    Recorder = sm90_compile.Recorder
    K._gathered_gemm_kernel, gemm = Recorder(K._gathered_gemm_kernel, calls), K._gathered_gemm_kernel
    K._grad_weight_kernel, gw = Recorder(K._grad_weight_kernel, calls), K._grad_weight_kernel
    P._proj_grad_kernel, pg = Recorder(P._proj_grad_kernel, calls), P._proj_grad_kernel
    out = []
    try:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for axis, shape, L in SHAPES:
                geo = K.geometry(shape, L, axis)
                x = torch.empty(shape, dtype=dtype)
                w = torch.empty(geo.F, geo.F, dtype=dtype)
                bias = torch.empty(geo.F, dtype=dtype)
                gm = torch.empty(shape[0], shape[-1], dtype=torch.float32) if axis != "t" else None
                part = K.mean_partials(geo, dtype, "cpu") if axis != "t" else None
                K.launch_gemm(x, w, bias, x, geo, transpose_weight=True, mean_part=part)
                K.launch_gemm(x, w, None, x, geo, transpose_weight=False, grad_mean=gm)
                dw = torch.empty(1, geo.F, geo.F, dtype=torch.float32)
                db = torch.empty(1, geo.F, dtype=torch.float32)
                K.launch_grad_weight(x, x, geo, dw, db, grad_mean=gm)
                for name, (kernel, args, kwargs) in zip(("fwd", "dx", "dw"), calls):
                    out.append((f"{name} {dtype_name} {axis} {'x'.join(map(str, shape))} L={L}", kernel, args, kwargs))
                calls.clear()
            for shape, nbr in PROJ_SHAPES:
                geo = K.geometry(shape, 1, "c")
                xs = [torch.empty(shape, dtype=dtype) for _ in range(nbr)]
                alpha = torch.empty(shape[0], shape[-1], nbr, dtype=torch.float32)
                w = torch.empty(geo.F, geo.F, dtype=dtype)
                bias = torch.empty(geo.F, dtype=dtype)
                K.launch_gemm(xs[0], w, bias, xs[0], geo, transpose_weight=True, more=tuple(xs[1:]), alpha=alpha)
                blocks = K.gemm_blocks(geo.M, geo.F, dtype)
                part = K.batch_partials(geo, blocks, nbr * geo.F, torch.float32, "cpu")
                P.launch_proj_grad(xs[0], w, xs, alpha, geo, xs, part)
                dw = torch.empty(1, geo.F, geo.F, dtype=torch.float32)
                db = torch.empty(1, geo.F, dtype=torch.float32)
                K.launch_grad_weight(xs[0], xs[0], geo, dw, db, more=tuple(xs[1:]), alpha=alpha)
                for name, (kernel, args, kwargs) in zip(("proj-fwd", "proj-da", "proj-dw"), calls):
                    out.append((f"{name} {dtype_name} K={nbr} {'x'.join(map(str, shape))} L=1", kernel, args, kwargs))
                calls.clear()
    finally:
        K._gathered_gemm_kernel, K._grad_weight_kernel = gemm, gw
        P._proj_grad_kernel = pg
    return out


def _compile(kernel, args, kwargs):
    """Compile one recorded launch for sm_90 as the launcher would; returns the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = sm90_compile.launch_signature(kernel, args, kwargs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _loads(ptx: str) -> tuple[int, int, int]:
    """(vector, scalar) global loads in the PTX and how many of them are 16-byte cp.async copies:
    the pipelined operand loads are cp.async copies (sm90_compile.cp_async_bytes), the rest
    ld.global(.v2/.v4)."""
    loads = re.findall(r"ld\.global[\w.]*", ptx)
    copies = sm90_compile.cp_async_bytes(ptx)
    vector = sum(1 for op in loads if ".v2" in op or ".v4" in op) + sum(1 for n in copies if n > 4)
    scalar = len(loads) - sum(1 for op in loads if ".v2" in op or ".v4" in op) + sum(1 for n in copies if n <= 4)
    return vector, scalar, copies.count(16)


def main() -> None:
    for label, kernel, args, kwargs in _launches():
        ptx = _compile(kernel, args, kwargs)
        regs, spills = sm90_compile.ptxas_stats(ptx)
        vector, scalar, copies16 = _loads(ptx)
        print(
            f"{label}: regs={regs} spills={spills} vector_loads={vector} scalar_loads={scalar} copies_16B={copies16}",
            flush=True,
        )


_LINE = re.compile(
    r"^([\w-]+) (\w+) ([\w=]+) (\S+) L=(\d+): regs=(\d+) spills=(\d+) vector_loads=(\d+) scalar_loads=(\d+)"
    r" copies_16B=(\d+)$"
)


@pytest.fixture(scope="module")
def sm90_table():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [_LINE.match(line).groups() for line in proc.stdout.splitlines()]
    assert len(rows) == 3 * len(DTYPES) * (len(SHAPES) + len(PROJ_SHAPES))
    return rows


@pytest.mark.slow
def test_no_register_spills_on_sm90(sm90_table):
    spilled = [" ".join(r) for r in sm90_table if int(r[6]) != 0]
    assert not spilled, "\n".join(spilled)


def _channels_per_group(row) -> int:
    """D of a table row: C // L (L = G for axis "t", 1 for the channel FC and the proj)."""
    return int(row[3].split("x")[-1]) // int(row[4])


@pytest.mark.slow
def test_gathered_operands_load_as_vectors_on_sm90(sm90_table):
    """Every launch whose runs of D consecutive channels admit it moves some operand as
    vectors (cp.async of 8/16 bytes or ld.global.v*). An odd D (axis "t" of MorphMLP-S stage 3:
    392 / 8 = 49) leaves no aligned pair of channels to vectorize: there the gathered operands
    load as scalars -- the dW kernel, which reads nothing else, only scalars -- and the test
    says so rather than skipping them."""
    even = [r for r in sm90_table if _channels_per_group(r) % 2 == 0]
    odd = [r for r in sm90_table if _channels_per_group(r) % 2 == 1]
    assert even and odd
    assert all(int(r[7]) > 0 for r in even), [r for r in even if int(r[7]) == 0]
    assert all(int(r[8]) > 0 for r in odd), odd
    assert all(int(r[7]) == 0 for r in odd if r[0] == "dw"), odd


def _weight_copies(row) -> int:
    """The 16-byte cp.async copies of the weight tile [BLOCK_K, BLOCK_N] of a forward / dX
    launch at F = 392 (GPU tiles): per pipeline stage, its bytes over 16 bytes per thread."""
    import torch
    from mixops.kernels import morph_fc as K

    dtype = getattr(torch, row[1])
    b = K.gemm_blocks(1, 392, dtype)
    return b.k * b.n * dtype.itemsize // (16 * 32 * b.num_warps) * b.num_stages


@pytest.mark.slow
def test_weight_loads_as_16_byte_copies_at_F392_on_sm90(sm90_table, monkeypatch):
    """At F = 392 a weight row is 784 (bf16) or 1568 (fp32) bytes, a multiple of 16 that the
    JIT cannot see (392 is no multiple of 16 elements): the host-checked hint (weight_operand)
    makes the weight tile move in 16-byte cp.async copies, where it loaded as synchronous 2-byte
    loads (bf16) or 4-byte copies (fp32) before. Spatial D = 14 and temporal D = 49 bound the
    gathered operands (and the mean gradient of dX) to 8-byte copies, so the 16-byte copies
    are exactly the weight's."""
    monkeypatch.delenv("TRITON_INTERPRET")  # the GPU tiles
    rows = [r for r in sm90_table if r[0] in ("fwd", "dx") and r[3].endswith("x392") and r[2] in ("w", "t")]
    assert {(r[1], r[2]) for r in rows} == {(d, a) for d in DTYPES for a in ("w", "t")}
    assert all(int(r[9]) == _weight_copies(r) > 0 for r in rows), rows


if __name__ == "__main__":
    main()
