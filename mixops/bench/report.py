"""Printing and writing benchmark results: a text table, JSON, Markdown and (optionally) PNG."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [
    ("preset", "preset", "{}"),
    ("case", "case", "{}"),
    ("B", "batch", "{}"),
    ("mode", "mode", "{}"),
    ("backend", "backend", "{}"),
    ("ms", "median_ms", "{:.3f}"),
    ("x official", "speedup", "{:.2f}"),
    ("GB/s", "GBps", "{:.1f}"),
    ("% copy", "pct_copy", "{:.1f}"),
    ("TFLOP/s", "TFLOPs", "{:.2f}"),
    ("% matmul", "pct_matmul", "{:.1f}"),
    ("% peer", "pct_peer", "{:.1f}"),
    ("peak MB", "peak_MB", "{:.0f}"),
    ("err", "rel_err_vs_official", "{:.1e}"),
    ("status", "status", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(value)


def table(rows: list[dict]) -> list[list[str]]:
    return [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in rows]


def format_text(rows: list[dict]) -> str:
    cells = table(rows)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(meta: dict, rows: list[dict]) -> str:
    cells = table(rows)
    out = [f"# mixops-bench on {meta['device_name']}", ""]
    out += [f"- {k}: `{v}`" for k, v in meta.items() if k != "ceilings"]
    out += [f"- ceilings: `{json.dumps(meta['ceilings'])}`", ""]
    out.append("| " + " | ".join(cells[0]) + " |")
    out.append("|" + "---|" * len(cells[0]))
    out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(out) + "\n"


def write(out_dir: Path, stem: str, meta: dict, rows: list[dict], *, plot: bool = True) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` (and, if ``plot``, ``<stem>.png`` with matplotlib)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    paths[1].write_text(format_markdown(meta, rows))
    png = _plot(out_dir / f"{stem}.png", meta, rows) if plot else None
    return paths + ([png] if png else [])


def _plot(path: Path, meta: dict, rows: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in rows if r.get("speedup") is not None and r["backend"] != "official"]
    if not timed:
        return None
    labels = [f"{r['preset']} {r['case']} B{r['batch']} {r['mode']} [{r['backend']}]" for r in timed]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(timed) + 1.5))
    ax.barh(range(len(timed)), [r["speedup"] for r in timed])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(timed)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over official (higher is better)")
    ax.set_title(f"mixops-bench, {meta['device_name']}, {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
