"""What this machine can do at best, measured at start-up: the denominators of the
'% of ceiling' columns (DESIGN.md, performance protocol).

- copy bandwidth: a large device-to-device copy, counted as read + write bytes;
- matmul throughput: a large square matmul in the benchmark dtype (bf16 on a GPU).

The smoke sizes (a check that the CLI runs) fit in the caches, so they measure no ceiling:
``is_ceiling`` is then False and no '% of ceiling' is reported.
"""
from __future__ import annotations

import torch

from .timing import median_ms


def measure(device: torch.device, dtype: torch.dtype, *, smoke: bool = False) -> dict:
    if device.type == "cuda":
        copy_elems, n = (1 << 28, 8192) if not smoke else (1 << 20, 512)
    else:
        copy_elems, n = (1 << 24, 1024) if not smoke else (1 << 16, 128)
    src = torch.empty(copy_elems, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, warmup=2, rep=5 if smoke else 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = median_ms(lambda: a @ b, device, warmup=2, rep=5 if smoke else 20)
    return {
        "copy_GBps": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9,
        "matmul_TFLOPs": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "is_ceiling": not smoke,
    }
