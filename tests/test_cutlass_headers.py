"""The CUTLASS/CuTe headers the CUDA extension builds against: setup.py finds them (an explicit
MIXOPS_CUTLASS_INCLUDE, else the staged .cutlass/include, else the installed nvidia-cutlass wheel),
checks their version and says what to install when they are missing; benchmarks/stage_cutlass.sh
stages them for the offline GPU machine."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixops_testing import fake_cutlass_headers, setup_py

ROOT = Path(__file__).resolve().parent.parent
INSTALL = re.escape("pip install --no-deps nvidia-cutlass==4.2.0.0")

SETUP = setup_py()


def test_the_variable_alone_decides(tmp_path, monkeypatch):
    include = fake_cutlass_headers(tmp_path / "include")
    monkeypatch.setenv("MIXOPS_CUTLASS_INCLUDE", str(include))
    assert SETUP.cutlass_include() == include.resolve()
    # set but empty of headers: an error, not a silent fall-back to another copy
    monkeypatch.setenv("MIXOPS_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(SETUP.CutlassHeadersMissing, match=rf"MIXOPS_CUTLASS_INCLUDE \({tmp_path}\): {INSTALL}"):
        SETUP.cutlass_include()


def test_the_staged_copy_comes_before_the_installed_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXOPS_CUTLASS_INCLUDE", raising=False)
    monkeypatch.setattr(SETUP, "ROOT", tmp_path)
    wheel = fake_cutlass_headers(tmp_path / "site" / "include")
    monkeypatch.setattr(SETUP, "installed_cutlass_include", lambda: wheel)
    staged = fake_cutlass_headers(tmp_path / ".cutlass" / "include")
    assert SETUP.cutlass_include() == staged.resolve()
    shutil.rmtree(tmp_path / ".cutlass")
    assert SETUP.cutlass_include() == wheel.resolve()
    monkeypatch.setattr(SETUP, "installed_cutlass_include", lambda: None)
    with pytest.raises(SETUP.CutlassHeadersMissing,
                       match=rf"no CUTLASS/CuTe headers .*\.cutlass/include .*nvidia-cutlass \(None\): {INSTALL}"):
        SETUP.cutlass_include()


def test_another_version_is_refused(tmp_path, monkeypatch):
    include = fake_cutlass_headers(tmp_path / "include", version=(3, 9, 2))
    monkeypatch.setenv("MIXOPS_CUTLASS_INCLUDE", str(include))
    with pytest.raises(SETUP.CutlassHeadersMissing, match=rf"holds CUTLASS 3\.9\.2, mixops needs 4\.2\.x: {INSTALL}"):
        SETUP.cutlass_include()


@pytest.mark.skipif(importlib.util.find_spec("cutlass_library") is None, reason="nvidia-cutlass is not installed")
def test_the_installed_wheel_is_located_without_importing_it():
    include = SETUP.installed_cutlass_include()
    assert "cutlass_library" not in sys.modules  # its import loads the whole kernel generator
    assert (include / "cute" / "tensor.hpp").is_file()
    assert SETUP._cutlass_version(include)[:2] == SETUP.CUTLASS_VERSION


@pytest.mark.parametrize("force", [False, True], ids=["default", "forced"])
def test_missing_headers_skip_the_extension_or_fail_when_forced(tmp_path, monkeypatch, force):
    monkeypatch.setenv("MIXOPS_CUTLASS_INCLUDE", str(tmp_path))
    monkeypatch.delenv("MIXOPS_SKIP_CUDA", raising=False)
    monkeypatch.setenv("MIXOPS_FORCE_CUDA", "1" if force else "")
    # everything else the CUDA build needs is there
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(SETUP, "_find_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    if force:
        with pytest.raises(RuntimeError, match=rf"^MIXOPS_FORCE_CUDA=1 but no CUTLASS/CuTe headers .*: {INSTALL}$"):
            SETUP._cuda_build_decision()
    else:
        build, why = SETUP._cuda_build_decision()
        assert not build and re.fullmatch(rf"no CUTLASS/CuTe headers .*: {INSTALL}", why), why


# --- benchmarks/stage_cutlass.sh, in a scratch checkout with a stand-in wheel ---------------------

def _checkout_with_wheel(tmp_path, version=(4, 2, 1)):
    """(scratch checkout holding setup.py and the script, environment whose nvidia-cutlass wheel
    is a stand-in that must not be imported)."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", repo)
    shutil.copy(ROOT / "benchmarks" / "stage_cutlass.sh", repo / "benchmarks")
    package = tmp_path / "site" / "cutlass_library"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the wheel is located, never imported')\n")
    fake_cutlass_headers(package / "source" / "include", version)
    base = {k: v for k, v in os.environ.items() if k != "MIXOPS_CUTLASS_INCLUDE"}
    env = {**base, "PYTHONPATH": str(tmp_path / "site"),
           # the script runs `python3`: this interpreter's, as in an activated virtual environment
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return repo, env


def _stage(repo, env, *args):
    return subprocess.run(["bash", str(repo / "benchmarks" / "stage_cutlass.sh"), *args], env=env,
                          cwd=repo.parent, capture_output=True, text=True, timeout=120)


def test_stage_copies_the_installed_headers(tmp_path):
    repo, env = _checkout_with_wheel(tmp_path)
    staged = repo / ".cutlass" / "include"
    run = _stage(repo, env)
    assert run.returncode == 0, run.stderr
    assert (staged / "cute" / "tensor.hpp").is_file() and "CUTLASS_MINOR 2" in (staged / "cutlass" / "version.h").read_text()
    assert str(staged) in run.stdout and 'carry: [".cutlass"]' in run.stdout
    check = _stage(repo, env, "--check")
    assert check.returncode == 0 and check.stdout.strip() == str(staged), check


def test_stage_refuses_another_version_and_leaves_nothing(tmp_path):
    repo, env = _checkout_with_wheel(tmp_path, version=(3, 9, 2))
    run = _stage(repo, env)
    assert run.returncode == 1 and re.search(rf"holds CUTLASS 3\.9\.2, mixops needs 4\.2\.x: {INSTALL}", run.stderr), run.stderr
    assert not (repo / ".cutlass").exists()


def test_check_says_what_is_missing(tmp_path):
    repo, env = _checkout_with_wheel(tmp_path)
    run = _stage(repo, {**env, "MIXOPS_CUTLASS_INCLUDE": str(tmp_path)}, "--check")
    assert run.returncode == 1 and run.stdout == ""
    assert re.search(rf"^stage_cutlass: no CUTLASS/CuTe headers .*MIXOPS_CUTLASS_INCLUDE.*: {INSTALL}$", run.stderr, re.M), run.stderr
