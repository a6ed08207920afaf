"""The README stays true: its Python examples run as written, and its install commands are what CI runs."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples_for_every_family():
    assert len(BLOCKS) == 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {})


def _command_after(heading: str) -> str:
    """The one-line bash command of the README block that follows ``heading``."""
    found = re.search(rf"{re.escape(heading)}.*?```bash\n(.*?)\n```", README.read_text(), flags=re.S)
    assert found, heading
    return found[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (README.parent / ".ci" / "run").read_text()
    assert f"\n{_command_after('Install and run the tests')} || rc=$?\n" in ci


@pytest.mark.parametrize("heading", ["Install and run the benchmark", "Install and run the tests"])
def test_readme_commands_install_the_cutlass_headers_before_the_build(heading):
    """A fresh clone's build finds the CUTLASS/CuTe headers: the wheel is installed before mixops."""
    steps = _command_after(heading).split(" && ")
    assert "pip install --no-deps nvidia-cutlass==4.2.0.0" in steps
    build = next(i for i, step in enumerate(steps) if "--no-build-isolation -e" in step)
    assert steps.index("pip install --no-deps nvidia-cutlass==4.2.0.0") < build
