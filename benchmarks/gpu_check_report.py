"""What benchmarks/gpu_check.sh records besides the logs: the versions, and SUMMARY.md.

    python3 benchmarks/gpu_check_report.py versions WORK      # WORK/versions.json; prints the GPU folder name
    python3 benchmarks/gpu_check_report.py summary WORK OUT   # OUT/SUMMARY.md from what WORK and OUT hold

WORK holds the stages' logs and XML, OUT what the device returns (SUMMARY.md, the archive of
WORK, the bench results under results/<gpu>/). The summary reads only files, so it can be
rewritten at any time and says what a run cut short did finish. Benchmark ratios are reported
only from GPU runs (CUDA-event timing, real ceilings) and only for the backends under test: a CPU
dry run's wall-clock numbers are no measurement of a GPU kernel.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = ("passed", "failed", "error", "skipped")
FAST_BACKENDS = ("triton", "cuda")
# A backend whose output is this far from official's (relative L2, bf16 both sides) computed
# something else: its speed is not reported as a result.
MAX_BENCH_REL_ERR = 0.05
# The DESIGN.md targets the bench stage measures: (title, preset, mode, JSON field, unit, target).
HEADLINES = (
    ("MorphFC layer fwd+bwd, speedup over official", "morphmlp-s", "fwd+bwd", "speedup", "x", 2.0),
    ("MorphFC branch GEMM fwd, % of a plain matmul of the same M,N,K", "morphmlp-s-branch", "fwd", "pct_peer", "%", 80.0),
    ("MorphFC branch GEMM fwd+bwd, % of a plain matmul", "morphmlp-s-branch", "fwd+bwd", "pct_peer", "%", 80.0),
    ("ATM layer fwd+bwd, speedup over official", "activemlp-t", "fwd+bwd", "speedup", "x", 5.0),
    ("bare ATM gather fwd, % of the measured copy bandwidth", "activemlp-t-gather", "fwd", "pct_copy", "%", 70.0),
    ("DynaMixerOp fwd+bwd, speedup over official", "dynamixer-op", "fwd+bwd", "speedup", "x", 3.0),
    ("window attention (ws 14) fwd+bwd, speedup over pad + partition + SDPA + reverse", "uniformer-s-win", "fwd+bwd",
     "speedup", "x", 1.5),
    ("RepMLP deploy block fwd (RepMLPNet-T224), speedup over the official grouped 1x1 conv + gate", "repmlp-t224",
     "fwd", "speedup", "x", 1.3),
)
ARCHIVE = "gpu-check-files.tar.gz"
# what the device tool returns from $OUT (its README): 8 files, 2 folders down, plain names
MAX_RETURNED_FILES, MAX_RETURNED_DEPTH = 8, 2
RETURNED_NAME = re.compile(r"[A-Za-z0-9._/-]+")
SANITIZER_SUMMARY = re.compile(r"=+ (ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)")


# --- versions ---------------------------------------------------------------------------------

def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _module_version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:  # absent or broken: recorded as absent
        return None


def gpu_folder(device_name: str | None) -> str:
    """The benchmarks/results/<gpu> folder name: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    if not device_name:
        return "cpu-dry-run"
    name = re.sub(r"^nvidia\s+", "", device_name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _commit() -> dict:
    """The commit measured: MIXOPS_COMMIT from the caller (the device's copy of the tree may lack
    .git), else the checkout's HEAD, else unknown."""
    if os.environ.get("MIXOPS_COMMIT"):
        return {"commit": os.environ["MIXOPS_COMMIT"], "commit_source": "MIXOPS_COMMIT"}
    head = _run(["git", "rev-parse", "HEAD"])
    if head and re.fullmatch(r"[0-9a-f]{40}", head):
        dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
        return {"commit": head, "commit_source": "git, with uncommitted changes" if dirty else "git"}
    return {"commit": "unknown", "commit_source": "no MIXOPS_COMMIT and no .git in this copy"}


def versions(work: Path) -> str:
    import torch

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        **{name: _module_version(name) for name in ("triton", "torchvision", "pytest")},
        "nvcc": next((line for line in (_run(["nvcc", "--version"]) or "").splitlines() if "release" in line), None),
        "gpu": None, **_commit(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_GiB=round(p.total_memory / 2**30, 1),
                    driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    try:
        import mixops
    except ImportError as e:  # before the build stage installs it
        info["cuda_extension"] = f"mixops not importable yet ({e})"
    else:
        info["cuda_extension"] = mixops.cuda_extension_status()
    if "mixops" in sys.modules and sys.modules["mixops"].cuda_extension_available():
        info["extension_archs"] = str(torch.ops.mixops._cuda_arch_list())
    info["gpu_folder"] = gpu_folder(info["gpu"])
    (work / "versions.json").write_text(json.dumps(info, indent=2) + "\n")
    return info["gpu_folder"]


# --- reading what the stages left -------------------------------------------------------------

def _tsv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def read_junit(path: Path) -> list[dict]:
    """One record per testcase: file, test, backend, outcome, seconds, message."""
    records = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test a SIGINT stopped: pytest writes it nameless
            continue
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0] if text else ""
                break
        records.append({"file": file, "test": case.get("name"), "backend": props.get("backend", "-"),
                        "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    return records


def read_tests(work: Path, stem: str) -> tuple[list[dict], str] | None:
    """The junit XML when pytest got to write it, else the plugin's line-by-line log."""
    xml, log = work / f"{stem}.xml", work / f"{stem}-log.tsv"
    if xml.exists():
        try:
            return read_junit(xml), xml.name
        except ET.ParseError:
            pass
    if log.exists():  # a line being written while this reads it is left for the next summary
        rows = [{**r, "seconds": float(r["seconds"]), "message": ""} for r in _tsv(log)
                if re.fullmatch(r"[0-9.]+", r.get("seconds") or "")]
        return rows, f"{log.name} (no junit XML: pytest was stopped before writing it)"
    return None


def read_bench(out: Path) -> list[tuple[Path, dict]]:
    runs = []
    for path in sorted(out.glob("results/*/*.json")):
        try:
            runs.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError:  # mixops-bench is rewriting it right now
            pass
    return runs


# --- SUMMARY.md -------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows
    ]


def _stages_section(stages: list[dict]) -> list[str]:
    rows = [[s["stage"], s["status"], s["seconds"] or "-", s["limit"] or "-", s["note"] or ""] for s in stages]
    total = sum(float(s["seconds"]) for s in stages if s["seconds"])
    return ["## Stages", "", *_table(["stage", "status", "s", "limit s", "note"], rows),
            "", f"Stage time in all: {total:.0f} s.", ""]


def _tests_section(title: str, found) -> list[str]:
    lines = [f"## {title}", ""]
    if found is None:
        return lines + ["No results (the stage did not run or wrote nothing).", ""]
    records, source = found
    counts = Counter(r["outcome"] for r in records)
    total_s = sum(r["seconds"] for r in records)
    lines.append(f"{len(records)} tests: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES)
                 + f"; {total_s:.0f} s (from {source}).")
    groups: dict[tuple, Counter] = defaultdict(Counter)
    seconds: dict[tuple, float] = defaultdict(float)
    for r in records:
        groups[r["file"], r["backend"]][r["outcome"]] += 1
        seconds[r["file"], r["backend"]] += r["seconds"]
    rows = [[f"`{f}`", b, *(c[o] for o in OUTCOMES), f"{seconds[f, b]:.1f}",
             "ok" if c["passed"] and not c["failed"] + c["error"] else ("FAIL" if c["failed"] + c["error"] else "not run")]
            for (f, b), c in sorted(groups.items())]
    lines += ["", *_table(["test file", "backend", *OUTCOMES, "s", "verdict"], rows), ""]
    bad = [r for r in records if r["outcome"] in ("failed", "error")]
    if bad:
        lines.append(f"Failures ({len(bad)}, first 20):")
        lines += [f"- `{r['file']}::{r['test']}` [{r['backend']}] {r['outcome']}: {r['message'][:200]}" for r in bad[:20]]
        lines.append("")
    slow = sorted((r for r in records if r["outcome"] != "skipped"), key=lambda r: -r["seconds"])[:5]
    if slow:
        lines.append("Slowest: " + "; ".join(
            f"`{r['file'].split('/')[-1]}::{r['test']}` {r['seconds']:.1f} s" for r in slow))
        lines.append("")
    return lines


def _fmt(value: float, unit: str) -> str:
    return f"{value:.2f}x" if unit == "x" else f"{value:.0f}%"


def _bench_cell(row: dict | None, field: str, unit: str, target: float) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return row.get("status", "?")[:60]
    err = row.get("rel_err_vs_official")
    if err is None or not err <= MAX_BENCH_REL_ERR:
        return f"WRONG OUTPUT (rel err {err}), not reported"
    value = row.get(field)
    if value is None:
        return "-"
    return f"{_fmt(value, unit)} {'meets' if value >= target else 'below'} ({row['median_ms']:.3f} ms)"


def _bench_section(runs: list[tuple[Path, dict]], out: Path) -> list[str]:
    lines = ["## Benchmarks", ""]
    if not runs:
        return lines + ["No results (the stage did not run or wrote nothing).", ""]
    gpu_runs = []
    for path, data in runs:
        meta, rows = data["meta"], data["results"]
        ceil = meta.get("ceilings", {})
        done = len({(r["preset"], r["case"], r["batch"]) for r in rows})
        state = "complete" if meta.get("complete", True) else f"CUT SHORT after {done} cases"
        trusted = meta["timing"].startswith("CUDA events") and ceil.get("is_ceiling")
        lines.append(f"- `{path.relative_to(out)}`: {meta['device_name']}, {meta['dtype']}, {meta['timing']}, "
                     f"warmup {meta['warmup']} / rep {meta['rep']}; ceilings measured in the same run: copy "
                     f"{ceil.get('copy_GBps', 0):.4g} GB/s, {ceil.get('matmul_dtype')} matmul "
                     f"{ceil.get('matmul_TFLOPs', 0):.4g} TFLOP/s; {state}; commit {meta.get('commit')}"
                     + ("" if trusted else "; NOT a GPU measurement (CPU wall clock or smoke sizes)"))
        if trusted:
            gpu_runs.append(data)
    lines.append("")
    if not gpu_runs:
        statuses = Counter(r["status"].split(" (")[0] for _, d in runs for r in d["results"])
        return lines + ["No GPU measurement, so no ratio is reported. "
                        "Row statuses: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + ".", ""]
    rows = [r for d in gpu_runs for r in d["results"]]
    official = {(r["preset"], r["case"], r["batch"], r["mode"]): r for r in rows if r["backend"] == "official"}
    for title, preset, mode, field, unit, target in HEADLINES:
        keys = sorted({(r["case"], r["batch"]) for r in rows if r["preset"] == preset and r["mode"] == mode})
        lines.append(f"### {title} (target {target:g}{unit})")
        if not keys:
            lines += ["", "not measured", ""]
            continue
        table = []
        for case, batch in keys:
            pick = {r["backend"]: r for r in rows
                    if (r["preset"], r["case"], r["batch"], r["mode"]) == (preset, case, batch, mode)}
            ref = official.get((preset, case, batch, mode))
            ref_ms = f"{ref['median_ms']:.3f}" if ref and ref.get("status") == "ok" else (ref or {}).get("status", "-")
            table.append([case, batch, ref_ms, *(_bench_cell(pick.get(b), field, unit, target) for b in FAST_BACKENDS)])
        lines += ["", *_table(["case", "B", "official ms", *FAST_BACKENDS], table), ""]
    return lines


def _sanitizer_section(work: Path) -> list[str]:
    lines = ["## compute-sanitizer", ""]
    tools = _tsv(work / "sanitize.tsv")
    if not tools:
        return lines + ["Not run.", ""]
    for t in tools:
        log, xml = work / f"sanitize-{t['tool']}.log", work / f"sanitize-{t['tool']}.xml"
        facts = [t["status"] + (f" ({t['note']})" if t["note"] else ""), f"{t['seconds']} s"]
        if xml.exists():  # a clean run of skipped tests (no extension) checked nothing
            counts = Counter(r["outcome"] for r in read_junit(xml))
            facts.append(", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no case ran")
        if log.exists():
            facts += SANITIZER_SUMMARY.findall(log.read_text(errors="replace"))
        lines.append(f"- {t['tool']}: " + "; ".join(facts))
    cases_file = work / "sanitize-cases.txt"
    cases = [line for line in cases_file.read_text().splitlines() if "::" in line] if cases_file.exists() else []
    cuda_files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*_cuda.py"))
    uncovered = [f for f in cuda_files if not any(c.startswith(f + "::") for c in cases)]
    lines += ["", "Cases: " + (", ".join(f"`{c}`" for c in cases) or "none selected")]
    if uncovered:
        lines.append("CUDA test files with no sanitizer case: " + ", ".join(f"`{f}`" for f in uncovered))
    return lines + [""]


def _versions_line(work: Path) -> list[str]:
    path = work / "versions.json"
    if not path.exists():
        return ["Versions: not recorded.", ""]
    v = json.loads(path.read_text())
    gpu = "no GPU"
    if v["gpu"]:
        gpu = f"{v['gpu']} ({v['capability']}, {v['sms']} SMs, {v['memory_GiB']} GiB, driver {v['driver']})"
    return [f"- commit: `{v['commit']}` ({v['commit_source']})",
            f"- GPU: {gpu}",
            f"- torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, torchvision {v['torchvision']}, "
            f"pytest {v['pytest']}, python {v['python']}, nvcc: {v['nvcc']}",
            f"- CUDA extension: {v['cuda_extension']}"
            + (f", built for {v['extension_archs']}" if v.get("extension_archs") else ""),
            ""]


def _files_section(work: Path, out: Path) -> list[str]:
    archived = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    returned = sorted({*(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()), "SUMMARY.md", ARCHIVE})
    lines = ["## Files", "", "In `$OUT`: " + ", ".join(f"`{f}`" for f in returned) + ".",
             f"In `{ARCHIVE}`: " + ", ".join(f"`{f}`" for f in archived) + ".", ""]
    beyond = [f for f in returned if f.count("/") > MAX_RETURNED_DEPTH or not RETURNED_NAME.fullmatch(f)]
    if len(returned) > MAX_RETURNED_FILES or beyond:
        lines += [f"WARNING: the device returns at most {MAX_RETURNED_FILES} files, at most "
                  f"{MAX_RETURNED_DEPTH} folders down; not all of these come back ({', '.join(beyond)}).", ""]
    return lines


def summary(work: Path, out: Path) -> Path:
    stages = _tsv(work / "stages.tsv")
    not_ok = [f"{s['stage']} {s['status']}" for s in stages if s["status"] != "ok"]
    mode = " (DRY RUN: no GPU, no build; checks the script only)" if (work / "DRY_RUN").exists() else ""
    lines = [f"# GPU check{mode}", "",
             "All stages ok." if stages and not not_ok else "Stages not ok: " + ", ".join(not_ok) + ".", "",
             *_versions_line(work), *_stages_section(stages),
             *_tests_section("Kernel tests on the GPU (pytest -m needs_cuda)", read_tests(work, "tests")),
             *_bench_section(read_bench(out), out), *_sanitizer_section(work), *_files_section(work, out)]
    path = out / "SUMMARY.md"
    tmp = out / ".SUMMARY.md.tmp"  # same file system: the rename is atomic
    tmp.write_text("\n".join(lines))
    tmp.replace(path)  # a reader (or a kill) never sees half a summary
    return path


def main(argv: list[str]) -> int:
    if not (argv[:1] == ["versions"] and len(argv) == 2 or argv[:1] == ["summary"] and len(argv) == 3):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "versions":
        print(versions(Path(argv[1])))
    else:
        summary(Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
