"""benchmarks/gpu_check.sh, the prepared GPU check, cannot rot: its dry run runs here end to end,
and its report (SUMMARY.md) is checked on a made-up GPU run with failures, a timeout and a wrong
benchmark output."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mixops_testing import fake_cutlass_headers, setup_py

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("gpu_check_report")
plugin = _load("gpu_check_plugin")
NO_XDIST = pytest.mark.skipif(importlib.util.find_spec("xdist") is None,
                              reason="pytest-xdist is not installed (as in CI)")


def _returned_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    # the script runs `python3`: this interpreter's, as in an activated virtual environment
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "OUT": str(out), "TMPDIR": str(tmp_path), "MIXOPS_COMMIT": "0123abc"}
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "read " + str(out / "SUMMARY.md") in run.stdout
    assert not list(tmp_path.glob("mixops-gpu-check.*")), "the work folder is removed at the end"

    # what the device tool returns: at most 8 files, at most 2 folders down
    files = _returned_files(out)
    assert len(files) <= report.MAX_RETURNED_FILES and all(f.count("/") <= 2 for f in files), files
    (stem,) = {f[:-5] for f in files if f.endswith(".json")}
    assert stem.startswith("results/cpu-dry-run/") and {"SUMMARY.md", report.ARCHIVE, f"{stem}.md"} <= set(files)

    summary = (out / "SUMMARY.md").read_text()
    assert summary.startswith("# GPU check (DRY RUN") and "All stages ok." in summary
    assert "`0123abc` (MIXOPS_COMMIT)" in summary
    for stage in ("build", "tests", "bench", "sanitize"):
        assert re.search(rf"^\| {stage} \| ok \| \d+ \| \d+ \|", summary, re.M), stage
    # the headers the CUDA build would use, found as setup.py finds them
    assert f"CUTLASS headers: {setup_py().cutlass_include()})" in summary
    assert "compute-sanitizer: not available" in summary or "compute-sanitizer found at" in summary
    assert "`tests/test_atm_cuda.py::test_gpu_small_case_for_compute_sanitizer`" in summary
    assert "CUDA test files with no sanitizer case" not in summary
    # CPU wall-clock numbers are no GPU measurement: no ratio, no verdict
    assert "No GPU measurement, so no ratio is reported" in summary
    assert not re.search(r"\b(meets|below)\b", summary)

    with tarfile.open(out / report.ARCHIVE) as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
        assert {"tests.xml", "tests-log.tsv", "tests.log", "bench.log", "versions.json", "stages.tsv",
                "sanitize.tsv", "sanitize-cases.txt"} <= names
        junit = report.read_junit(tar.extractfile("./tests.xml"))
    # every needs_cuda test was collected (and, without a GPU, skipped), kernel test files included
    assert len(junit) > 100 and {r["outcome"] for r in junit} == {"skipped"}
    tested = {r["file"] for r in junit}
    assert {"tests/test_atm_triton.py", "tests/test_morph_fc_triton.py", "tests/test_atm_cuda.py"} <= tested
    assert {r["backend"] for r in junit if r["file"] == "tests/test_atm_ops.py"} >= {"torch", "triton"}

    data = json.loads((out / f"{stem}.json").read_text())
    assert data["meta"]["commit"] == "0123abc" and data["meta"]["complete"] is True
    assert {r["preset"] for r in data["results"]} == {"morphmlp-s", "activemlp-t", "morphmlp-s-branch", "activemlp-t-gather",
                                                         "dynamixer-op", "uniformer-s-win", "repmlp-t224"}
    assert all(r["status"].startswith("unavailable") for r in data["results"] if r["backend"] in ("triton", "cuda"))


# --- the GPU-only paths, through a stand-in python3 ---------------------------------------------

# python3 for the script: `-m pip` and `-m pytest` are recorded (one line each: the build's
# variables, then the arguments) and answered as STUB_MODE says; `versions` (a torch import, whose
# time would eat a small budget unevenly) records nothing; anything else runs for real
STUB_PYTHON = """#!/usr/bin/env bash
[ "$1 $2" = "benchmarks/gpu_check_report.py versions" ] && { echo stub-gpu; exit 0; }
# the stand-in pip builds nothing: the extension check answers so, whatever this machine has built
if [ "$1" = -c ] && [[ "$2" == *cuda_extension_available* ]]; then echo "stub: no extension"; exit 1; fi
if [ "$1" = -m ] && { [ "$2" = pip ] || [ "$2" = pytest ]; }; then
  echo "skip=${MIXOPS_SKIP_CUDA:-} force=${MIXOPS_FORCE_CUDA:-} arch=${TORCH_CUDA_ARCH_LIST:-} args=${*:2}" >>"$STUB_LOG"
  case "$STUB_MODE:$*" in
  pep668:*--break-system-packages*) ;;
  pep668:*pip*) echo "error: externally-managed-environment"; exit 1 ;;
  slow-build:*pip*) [ -z "${MIXOPS_FORCE_CUDA:-}" ] || while :; do echo building; done ;;  # a log always growing
  esac
  exit 0
fi
exec %s "$@"
"""


def _run_stubbed(tmp_path, stages, mode, **env):
    """gpu_check.sh, not a dry run, with python3's pip and pytest stood in for and stand-in CUTLASS
    headers (MIXOPS_CUTLASS_INCLUDE, unless given); returns (Popen, OUT)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    env.setdefault("MIXOPS_CUTLASS_INCLUDE", str(fake_cutlass_headers(tmp_path / "cutlass-include")))
    (bin_dir / "python3").write_text(STUB_PYTHON % sys.executable)
    (bin_dir / "python3").chmod(0o755)
    # hermetic: CI exports MIXOPS_FORCE_CUDA, TORCH_CUDA_ARCH_LIST, ... for its own build
    base = {k: v for k, v in os.environ.items() if not k.startswith("MIXOPS_") and k != "TORCH_CUDA_ARCH_LIST"}
    env = {**base, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OUT": str(out),
           "TMPDIR": str(tmp_path), "STUB_LOG": str(tmp_path / "calls.log"), "STUB_MODE": mode, **env}
    return subprocess.Popen(["bash", str(SCRIPT), *stages], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out


def _calls(tmp_path) -> list[str]:
    return (tmp_path / "calls.log").read_text().splitlines()


def _archive_names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {n.lstrip("./") for n in tar.getnames()}


def _archived_text(path: Path, name: str) -> str:
    with tarfile.open(path) as tar:
        return tar.extractfile(f"./{name}").read().decode()


def test_a_build_past_its_limit_leaves_the_pure_python_install(tmp_path):
    """The build stage times out: the pure-Python install came first, the summary says the
    extension is missing, the stages after it are skipped for want of time, and SUMMARY.md and
    the archive were rewritten while the build ran."""
    # the budget (less the 10 s kept for the last summary) leaves the build its 6 s cap and the
    # tests less than the 20 s a stage needs
    proc, out = _run_stubbed(tmp_path, ["build", "tests"], "slow-build", TORCH_CUDA_ARCH_LIST="9.0a",
                             MIXOPS_CHECK_BUDGET_S="24", MIXOPS_CHECK_CAPS="build=6", MIXOPS_CHECK_PUBLISH_S="2")
    archive, archives_seen, give_up = out / report.ARCHIVE, set(), time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < give_up:
        summary = (out / "SUMMARY.md").read_text() if (out / "SUMMARY.md").exists() else ""
        if "| build | running" in summary and archive.exists():
            archives_seen.add(archive.stat().st_mtime_ns)
            if "build.log" in _archive_names(archive):  # the periodic rewrite, mid-stage
                archives_seen.add("build.log")
        time.sleep(0.2)
    log = proc.communicate(timeout=1)[0]
    assert proc.returncode == 0, log
    assert "build.log" in archives_seen and len(archives_seen) >= 3, (archives_seen, log)

    summary = (out / "SUMMARY.md").read_text()
    assert re.search(r"^\| build \| timed out \| \d+ \| 6 \| CUDA build \(TORCH_CUDA_ARCH_LIST=9\.0a MAX_JOBS=\d+\) "
                     r"not finished: installed without the extension \|", summary, re.M), summary
    assert re.search(r"^\| tests \| skipped \| 0 \| -?\d+ \| not enough time left \|", summary, re.M), summary
    assert "Stages not ok: build timed out, tests skipped." in summary
    pure, cuda = _calls(tmp_path)
    assert pure.startswith("skip=1 force= ") and " -v " not in pure
    assert cuda.startswith("skip= force=1 arch=9.0a ") and "pip install --no-index --no-build-isolation" in cuda
    assert " -v -e ." in cuda
    assert "building" in _archived_text(archive, "build.log")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary file stays in $OUT"
    assert not list(tmp_path.glob("mixops-gpu-check*")), "no work folder or snapshot stays behind"


def test_the_build_retries_past_an_externally_managed_python(tmp_path):
    """PEP 668: a system python3 refuses pip; both installs then pass --break-system-packages."""
    proc, out = _run_stubbed(tmp_path, ["build"], "pep668", TORCH_CUDA_ARCH_LIST="8.0")
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    refused, pure, cuda = _calls(tmp_path)
    assert refused.startswith("skip=1 ") and "--break-system-packages" not in refused
    assert pure.startswith("skip=1 ") and "--break-system-packages" in pure
    assert cuda.startswith("skip= force=1 arch=8.0 ") and "--break-system-packages -v" in cuda
    # the stand-in built nothing: the stage says so rather than ok
    summary = (out / "SUMMARY.md").read_text()
    assert re.search(r"^\| build \| failed \(exit 1\) \| .*the extension does not load \|", summary, re.M), summary


@NO_XDIST
def test_the_tests_stage_shares_the_gpu_among_xdist_workers(tmp_path):
    proc, out = _run_stubbed(tmp_path, ["tests"], "ok")
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    (pytest_call,) = _calls(tmp_path)
    assert "-m needs_cuda -n 4 --dist loadfile -v" in pytest_call and "-p gpu_check_plugin" in pytest_call
    summary = (out / "SUMMARY.md").read_text()
    assert re.search(r"^\| tests \| ok \| \d+ \| \d+ \| -n 4 --dist loadfile \|", summary, re.M), summary


def test_missing_cutlass_headers_stop_the_check_before_any_stage(tmp_path):
    """On the GPU machine the headers come only from the staged .cutlass: without them the script
    stops in seconds, saying how to stage them, instead of spending the loan on a failing build."""
    proc, out = _run_stubbed(tmp_path, ["build", "tests"], "ok", MIXOPS_CUTLASS_INCLUDE=str(tmp_path))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, log
    assert re.search(r"no CUTLASS/CuTe headers .*: pip install --no-deps nvidia-cutlass==4\.2\.0\.0", log), log
    assert "run 'bash benchmarks/stage_cutlass.sh', then the device call with carry: [\".cutlass\"]" in log, log
    assert not (tmp_path / "calls.log").exists(), "nothing was installed or tested"
    assert not out.exists() and not list(tmp_path.glob("mixops-gpu-check*"))


def test_the_headers_matter_only_to_the_build(tmp_path):
    proc, _ = _run_stubbed(tmp_path, ["tests"], "ok", MIXOPS_CUTLASS_INCLUDE=str(tmp_path))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log


def test_unknown_stage_is_refused():
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "benchmark"], capture_output=True, text=True)
    assert run.returncode == 2 and "gpu_check.sh --dry-run" in run.stderr


def test_gpu_folder_names():
    assert report.gpu_folder("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert report.gpu_folder("NVIDIA H200") == "h200"
    assert report.gpu_folder(None) == "cpu-dry-run"


# --- the report on a made-up GPU run -----------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_atm_cuda" name="test_gpu_prime_batch" file="tests/test_atm_cuda.py" time="1.5">
  <properties><property name="backend" value="cuda"/></properties></testcase>
<testcase classname="tests.test_atm_cuda" name="test_gpu_fc[bf16]" file="tests/test_atm_cuda.py" time="0.5">
  <properties><property name="backend" value="cuda"/></properties>
  <failure message="AssertionError: rel err 3e-1 &gt; 2e-2">long traceback</failure></testcase>
<testcase classname="tests.test_atm_ops" name="test_atm_fc[triton-h-cuda]" file="tests/test_atm_ops.py" time="0.25">
  <properties><property name="backend" value="triton"/></properties></testcase>
<testcase classname="tests.test_atm_ops" name="test_atm_fc[torch-h-cuda]" file="tests/test_atm_ops.py" time="0.25">
  <properties><property name="backend" value="torch"/></properties><skipped message="no"/></testcase>
<testcase time="0.000" />
</testsuite></testsuites>"""  # the last: how pytest writes the test a SIGINT (a stage's time limit) stopped


def _row(backend, ms, **extra):
    return {"preset": "morphmlp-s", "case": "s1 56x56 C112 L14", "batch": 128, "mode": "fwd+bwd",
            "backend": backend, "status": "ok", "median_ms": ms, "rel_err_vs_official": 0.004, **extra}


def _gpu_run(work, out):
    (work / "stages.tsv").write_text(
        "stage\tstatus\tseconds\tlimit\tnote\nbuild\tok\t95\t300\tTORCH_CUDA_ARCH_LIST=9.0a\n"
        "tests\ttimed out\t230\t230\t\nbench\tpending\t\t\t\n")
    (work / "versions.json").write_text(json.dumps({
        "python": "3.12.3", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "torchvision": "0.26.0",
        "pytest": "8", "nvcc": "release 13.0", "gpu": "NVIDIA H100 80GB HBM3", "capability": "sm_90",
        "sms": 132, "memory_GiB": 79.2, "driver": "580", "commit": "f" * 40, "commit_source": "MIXOPS_COMMIT",
        "cuda_extension": "loaded", "extension_archs": "['sm_90a']", "gpu_folder": "h100-80gb-hbm3"}))
    results = out / "results" / "h100-80gb-hbm3"
    results.mkdir(parents=True)
    meta = {"device_name": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "timing": "CUDA events, median",
            "warmup": 5, "rep": 30, "commit": "f" * 40, "complete": False,
            "ceilings": {"copy_GBps": 3000.0, "matmul_TFLOPs": 700.0, "matmul_dtype": "bfloat16", "is_ceiling": True}}
    rows = [_row("official", 5.0, speedup=1.0), _row("triton", 2.0, speedup=2.5),
            _row("cuda", 4.0, speedup=1.25, rel_err_vs_official=0.5),
            {**_row("peer:matmul", 1.0), "preset": "morphmlp-s-branch", "mode": "fwd"},
            {**_row("triton", 1.6, pct_peer=62.5), "preset": "morphmlp-s-branch", "mode": "fwd"}]
    (results / "2026-12-07T010000Z.json").write_text(json.dumps({"meta": meta, "results": rows}))


def test_summary_of_a_gpu_run(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    _gpu_run(work, out)
    (work / "tests.xml").write_text(JUNIT)
    text = report.summary(work, out).read_text()
    assert text.startswith("# GPU check\n")
    assert "Stages not ok: tests timed out, bench pending." in text
    assert "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs" in text and f"`{'f' * 40}` (MIXOPS_COMMIT)" in text
    assert "4 tests: 2 passed, 1 failed, 0 error, 1 skipped" in text
    assert "| `tests/test_atm_cuda.py` | cuda | 1 | 1 | 0 | 0 | 2.0 | FAIL |" in text
    assert "| `tests/test_atm_ops.py` | triton | 1 | 0 | 0 | 0 | 0.2 | ok |" in text
    assert "| `tests/test_atm_ops.py` | torch | 0 | 0 | 0 | 1 | 0.2 | not run |" in text
    assert "`tests/test_atm_cuda.py::test_gpu_fc[bf16]` [cuda] failed: AssertionError: rel err 3e-1 > 2e-2" in text
    # the ratios, each against its DESIGN.md target; a wrong output's speed is not reported
    assert "CUT SHORT after 2 cases" in text
    assert "| s1 56x56 C112 L14 | 128 | 5.000 | 2.50x meets (2.000 ms) | WRONG OUTPUT (rel err 0.5), not reported |" in text
    assert "62% below (1.600 ms)" in text
    assert "### ATM layer fwd+bwd, speedup over official (target 5x)\n\nnot measured" in text
    assert "compute-sanitizer\n\nNot run." in text


def test_summary_of_the_sanitizers(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "sanitize.tsv").write_text("tool\tstatus\tseconds\tnote\nmemcheck\tok\t40\t\n"
                                       "racecheck\tfailed (exit 99)\t35\t\n")
    (work / "sanitize-memcheck.log").write_text("2 passed\n========= ERROR SUMMARY: 0 errors\n")
    (work / "sanitize-racecheck.log").write_text(
        "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n")
    case = '<testcase classname="tests.test_atm_cuda" name="test_gpu_small_case_for_compute_sanitizer" time="1"/>'
    (work / "sanitize-memcheck.xml").write_text(f"<testsuites><testsuite>{case}</testsuite></testsuites>")
    (work / "sanitize-cases.txt").write_text("tests/test_atm_cuda.py::test_gpu_small_case_for_compute_sanitizer\n")
    text = report.summary(work, out).read_text()
    assert "- memcheck: ok; 40 s; 1 passed; ERROR SUMMARY: 0 errors" in text
    assert "- racecheck: failed (exit 99); 35 s; RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)" in text
    # every CUDA family's test file needs a sanitizer case
    (uncovered,) = [line for line in text.splitlines() if line.startswith("CUDA test files with no sanitizer case")]
    assert "`tests/test_morph_fc_cuda.py`" in uncovered and "test_atm_cuda" not in uncovered


def test_summary_falls_back_to_the_line_log(tmp_path):
    """A stage killed before pytest wrote its XML still reports the tests that finished."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "tests-log.tsv").write_text(
        "file\ttest\tbackend\toutcome\tseconds\n"
        "tests/test_morph_fc_triton.py\ttest_gpu_int64_offsets\ttriton\tpassed\t3.000\n"
        "tests/test_morph_fc_triton.py\ttest_gpu_x[bf16]\ttriton\terror\t0.500\n")
    text = report.summary(work, out).read_text()
    assert "2 tests: 1 passed, 0 failed, 1 error, 0 skipped; 4 s (from tests-log.tsv (no junit XML" in text
    assert "| `tests/test_morph_fc_triton.py` | triton | 1 | 0 | 1 | 0 | 3.5 | FAIL |" in text


def test_summary_warns_when_out_holds_more_than_the_device_returns(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True), work.mkdir()
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    for i in range(8):
        (out / f"f{i}.txt").write_text("x")
    text = report.summary(work, out).read_text()
    assert "WARNING: the device returns at most 8 files" in text and "a/b/c/deep.txt" in text


# --- the pytest plugin -------------------------------------------------------------------------

PLUGIN_TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup fails")

@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_op(backend):
    assert backend == "torch"

def test_skipped():
    pytest.skip("no GPU")

def test_setup_error(broken):
    pass
'''


@pytest.mark.parametrize("workers", [pytest.param([], id="one-process"),
                                     pytest.param(["-n", "2"], marks=NO_XDIST, id="xdist")])
def test_plugin_labels_backends_and_logs_each_test(tmp_path, workers):
    """Under pytest-xdist the controller alone writes the log: one line per test, not one per process."""
    (tmp_path / "test_family_cuda.py").write_text(PLUGIN_TESTS)
    log, xml = tmp_path / "log.tsv", tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
    subprocess.run([sys.executable, "-m", "pytest", "-p", "gpu_check_plugin", "-p", "no:cacheprovider", *workers,
                    "-o", "junit_family=xunit1", f"--junitxml={xml}", f"--gpu-check-log={log}", "-q",
                    "test_family_cuda.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    expected = {("test_op[torch]", "torch", "passed"), ("test_op[cuda]", "cuda", "failed"),
                # no backend argument: the backend the file is named after
                ("test_skipped", "cuda", "skipped"), ("test_setup_error", "cuda", "error")}
    lines = log.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == plugin.LOG_COLUMNS
    logged = [(r[1], r[2], r[3]) for r in (line.split("\t") for line in lines[1:])]
    assert sorted(logged) == sorted(expected)
    assert {(r["test"], r["backend"], r["outcome"]) for r in report.read_junit(xml)} == expected
