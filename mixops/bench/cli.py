"""``mixops-bench``: time the official computation, its torch.compile, and the mixops backends
on the stage shapes of the model configs, forward and forward+backward.

    mixops-bench                          # the DESIGN.md target presets, every backend
    mixops-bench activemlp-t --modes fwd+bwd --batch 127
    mixops-bench --list

On a machine without a GPU it runs on CPU tensors (wall-clock timing, B = 1, fp32) and says
so: the numbers then compare the reference with its torch.compile, not GPU kernels.

Cases with a peer (the MorphFC branch presets) also time a plain torch op of the same sizes,
the matmul of the same M, N, K, in the same run, and report each backend's speed as "% peer".
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .. import __version__, backend, cuda_extension_status
from . import ceilings, presets, report
from .timing import median_ms, peak_memory_mb

BACKENDS = ("official", "compile", "triton", "cuda")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _parse(argv):
    p = argparse.ArgumentParser(prog="mixops-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("presets", nargs="*", help=f"presets to run (default: {' '.join(presets.DEFAULT)})")
    p.add_argument("--list", action="store_true", help="list the presets and their cases, then exit")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of %(default)s")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of %(default)s")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--batch", type=int, action="append", help="batch size(s), overriding the presets'")
    p.add_argument("--warmup", type=int, help="untimed calls per measurement (default 10 GPU / 2 CPU)")
    p.add_argument("--rep", type=int, help="timed calls per measurement (default 50 GPU / 5 CPU)")
    p.add_argument("--max-cases", type=int, help="run only the first N cases of each preset")
    p.add_argument("--out", default="bench-out", help="directory for the JSON/Markdown/PNG results")
    p.add_argument("--smoke", action="store_true", help="tiny run that checks the CLI end to end")
    args = p.parse_args(argv)
    for name, allowed in (("backends", BACKENDS), ("modes", MODES)):
        values = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: unknown {bad}, expected a comma list of {allowed}")
        setattr(args, name, values)
    return args


def _git_commit() -> str:
    """MIXOPS_COMMIT when set (a copy of the tree without .git, e.g. on a lent GPU machine,
    gets the commit from its caller), else the checkout's HEAD."""
    if os.environ.get("MIXOPS_COMMIT"):
        return os.environ["MIXOPS_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _meta(device, dtype, args, ceil) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = device.type == "cuda"
    return {
        "device_name": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "timing": "CUDA events, median" if gpu else "wall clock (perf_counter) on CPU tensors, median",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "mixops": __version__,
        "commit": _git_commit(),
        "cuda_extension": cuda_extension_status(),
        "command": " ".join(["mixops-bench", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "warmup": args.warmup,
        "rep": args.rep,
        "ceilings": ceil,
    }


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _runner(fn, inputs, diff, mode, grad_out):
    """A zero-argument call of one measurement: inference forward, or forward + backward
    (the gradients of ``diff``)."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
    else:
        def run():
            out = fn(*inputs)
            # allow_unused: e.g. a window map without padding never reads the qkv bias
            return torch.autograd.grad(out, diff, grad_out.reshape(out.shape), allow_unused=True)
    return run


def _peer_row(peer, row, mode, grad_out, device, args) -> tuple[dict, float | None]:
    """Time the case's plain-torch peer (same sizes): its row and its median (None if it failed)."""
    row = {**row, "backend": f"peer:{peer.name}"}
    try:
        ms = median_ms(_runner(peer.fn, peer.inputs, peer.inputs, mode, grad_out), device,
                       warmup=args.warmup, rep=args.rep)
    except Exception as e:  # reported in its row, like a failing backend
        return {**row, "status": f"error: {type(e).__name__}: {e}"[:200]}, None
    return {**row, "status": "ok", "median_ms": ms}, ms


def _backend_fn(name, case, built, device):
    """The callable for a backend, or the reason it cannot run here."""
    if name == "official":
        return built.official, None
    if name == "compile":
        return torch.compile(built.official), None
    if device.type != "cuda":
        return None, "unavailable (needs a CUDA device)"
    missing = [op for op in case.ops if name not in backend.available_backends(op)]
    if missing:
        return None, f"unavailable (no {name} kernel for {', '.join(missing)})"

    def fast(*inputs):
        with backend.use_backend(name):
            return built.mixops(*inputs)

    return fast, None


def run_case(case, device, dtype, args) -> list[dict]:
    torch.manual_seed(0)
    built = case.build(device, dtype)
    with torch.no_grad():
        reference_out = built.official(*built.inputs)
    grad_out = torch.randn_like(reference_out)
    ceil = args.ceil if args.ceil["is_ceiling"] else None
    io_bytes = _nbytes(built.inputs), _nbytes(built.params), _nbytes([reference_out])
    rows = []
    for mode in args.modes:
        i, p, o = io_bytes
        moved = i + p + o if mode == "fwd" else 3 * i + 3 * p + 2 * o
        flops = built.flops if mode == "fwd" else 3 * built.flops
        base = {"preset": case.preset, "case": case.name, "batch": case.batch, "mode": mode}
        official_ms = peer_ms = None
        if built.peer is not None:
            peer_row, peer_ms = _peer_row(built.peer, base, mode, grad_out, device, args)
            rows.append(peer_row)
        # official first, so every other backend's speedup has its denominator
        for name in sorted(args.backends, key=lambda b: b != "official"):
            row = {**base, "backend": name, "bytes": moved, "flops": flops}
            fn, why = _backend_fn(name, case, built, device)
            if fn is None:
                rows.append({**row, "status": why})
                continue
            try:
                run = _runner(fn, built.inputs, [*built.inputs, *built.params], mode, grad_out)
                with torch.no_grad():
                    out = fn(*built.inputs)
                err = float((out.float() - reference_out.float()).norm() / reference_out.float().norm().clamp_min(1e-30))
                ms = median_ms(run, device, warmup=args.warmup, rep=args.rep)
                peak = peak_memory_mb(run, device)
            except Exception as e:  # one failing backend must not hide the others' numbers
                rows.append({**row, "status": f"error: {type(e).__name__}: {e}"[:200]})
                continue
            if name == "official":
                official_ms = ms
            rows.append({
                **row, "status": "ok", "median_ms": ms, "rel_err_vs_official": err,
                "speedup": official_ms / ms if official_ms else None,
                "GBps": moved / (ms * 1e-3) / 1e9,
                "pct_copy": 100 * moved / (ms * 1e-3) / 1e9 / ceil["copy_GBps"] if ceil else None,
                # a pure data-movement case (flops 0) has no FLOP rate
                "TFLOPs": flops / (ms * 1e-3) / 1e12 if flops else None,
                "pct_matmul": 100 * flops / (ms * 1e-3) / 1e12 / ceil["matmul_TFLOPs"] if flops and ceil else None,
                "pct_peer": 100 * peer_ms / ms if peer_ms else None,
                "peak_MB": peak,
            })
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if args.smoke:
        args.batch = args.batch or [1]
        args.max_cases = args.max_cases or 1
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10 if gpu else 2)
    args.rep = args.rep if args.rep is not None else (2 if args.smoke else 50 if gpu else 5)

    table = presets.presets(device, args.batch)
    if args.list:
        for name, cases in table.items():
            print(f"{name}{'  (default)' if name in presets.DEFAULT else ''}")
            for c in cases:  # a case borrowed from another preset (headline) names it
                print(f"    {c.name}  B={c.batch}" + (f"  ({c.preset})" if c.preset != name else ""))
        return 0
    chosen = args.presets or presets.DEFAULT
    unknown = [n for n in chosen if n not in table]
    if unknown:
        print(f"mixops-bench: unknown preset(s) {unknown}; see --list", file=sys.stderr)
        return 2
    if not gpu:
        print("mixops-bench: no CUDA device; timing CPU tensors with the wall clock "
              "(reference vs torch.compile; the GPU backends are reported unavailable)")

    args.ceil = ceilings.measure(device, dtype, smoke=args.smoke)
    meta = _meta(device, dtype, args, args.ceil)
    print(f"device: {meta['device_name']}  dtype: {meta['dtype']}  torch {meta['torch']}  "
          f"copy {args.ceil['copy_GBps']:.1f} GB/s  matmul {args.ceil['matmul_TFLOPs']:.2f} TFLOP/s"
          + ("" if args.ceil["is_ceiling"] else "  (smoke sizes fit in cache: no % of ceiling reported)"))
    stem = meta["date"].replace(":", "")  # e.g. 2026-11-22T024501Z: runs never overwrite each other
    rows = []
    for name in chosen:
        cases = table[name][: args.max_cases] if args.max_cases else table[name]
        for case in cases:
            new = run_case(case, device, dtype, args)
            rows += new
            print(report.format_text(new).split("\n", 2)[-1])
            # rewritten after every case, so a run cut short (a time limit) keeps what it measured
            report.write(Path(args.out), stem, {**meta, "complete": False}, rows, plot=False)
    print()
    print(report.format_text(rows))
    for path in report.write(Path(args.out), stem, {**meta, "complete": True}, rows):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
