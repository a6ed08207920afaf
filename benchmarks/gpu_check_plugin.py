"""pytest plugin of benchmarks/gpu_check.sh (loaded with ``-p gpu_check_plugin``).

It labels every test with the backend it exercises, in the junit XML (a ``backend`` property)
and in a tab-separated log written line by line as tests finish (``--gpu-check-log``), so the
summary can count passes and failures per test file and backend even when the run is killed
before pytest writes its XML.

The backend is the test's ``backend`` argument (conftest runs an ``op`` test once per backend
registered for that op), else the one a family's kernel test file is named after
(``test_<family>_cuda.py``, ``test_<family>_triton.py``), else "-".
"""
from __future__ import annotations

from pathlib import Path

import pytest

FILE_BACKENDS = ("cuda", "triton")
LOG_COLUMNS = ("file", "test", "backend", "outcome", "seconds")


def pytest_addoption(parser):
    parser.addoption("--gpu-check-log", help="append one tab-separated line per finished test here")


def backend_of(item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "backend" in params:
        return str(params["backend"])
    stem = Path(str(item.fspath)).stem
    return next((b for b in FILE_BACKENDS if stem.endswith(f"_{b}")), "-")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.user_properties.append(("backend", backend_of(item)))


class _Log:
    """One line per test at its teardown: the worst outcome of its phases and their total time."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.write_text("\t".join(LOG_COLUMNS) + "\n")
        self.phases: dict[str, list] = {}

    def pytest_runtest_logreport(self, report):
        self.phases.setdefault(report.nodeid, []).append(report)
        if report.when != "teardown":
            return
        reports = self.phases.pop(report.nodeid)
        outcome = _outcome(reports)
        seconds = sum(r.duration for r in reports)
        file, _, test = report.nodeid.partition("::")
        backend = dict(report.user_properties).get("backend", "-")
        with self.path.open("a") as f:
            f.write(f"{file}\t{test}\t{backend}\t{outcome}\t{seconds:.3f}\n")


def _outcome(reports) -> str:
    """junit's words: an error in setup/teardown is 'error', a failed call 'failed'."""
    by_phase = {r.when: r for r in reports}
    if any(r.failed for w, r in by_phase.items() if w != "call"):
        return "error"
    call = by_phase.get("call")
    if call is None or by_phase["setup"].skipped:
        return "skipped"
    if call.failed:
        return "failed"
    return "skipped" if call.skipped else "passed"


def pytest_configure(config):
    path = config.getoption("--gpu-check-log")
    # under pytest-xdist the controller receives every worker's reports: only it writes the log
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Log(Path(path)), "gpu_check_log")
