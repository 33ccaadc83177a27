"""The repository keeps its promises: two Quickstart commands, CI runs the second verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_exactly_two_commands():
    assert len(quickstart_commands()) == 2


def test_ci_runs_the_readme_test_command():
    test_cmd = quickstart_commands()[1]
    assert "pytest" in test_cmd
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd.strip() in ci


def test_run_artefacts_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    for item in ("mlflow.db", "ray_results/", ".venv/", "/data/"):
        assert item in ignored


def test_the_test_command_lints_and_checks_formatting_before_the_suite(pytestconfig):
    test_cmd = quickstart_commands()[1]
    steps = [step.strip() for step in test_cmd.split("&&")]
    assert (
        steps.index(".venv/bin/ruff check .")
        < steps.index(".venv/bin/ruff format --check .")
        < len(steps) - 1
    )
    # The suite in two steps that together run every test: the default run leaves the multi-node
    # tests out (pyproject's addopts), the second runs exactly those.
    assert steps[-2:] == [".venv/bin/pytest", ".venv/bin/pytest -m multinode"]
    addopts = pytestconfig.getini("addopts")
    assert addopts[addopts.index("-m") + 1] == "not multinode"
    assert (
        "ruff" in (ROOT / "pyproject.toml").read_text().split("[tool.ruff]")[0]
    )  # installed by the dev extra


def test_no_test_file_is_named_like_a_ray_process():
    """``ray stop --force`` (which tests run after a ``ray start``) SIGKILLs every process whose
    command line contains one of Ray's process keywords: ``pytest tests/test_monitor.py`` matched
    "monitor.py" (the autoscaler's) and killed the run mid-suite."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    keywords = [k for k, by_name in RAY_PROCESSES if not by_name]
    here = Path(__file__).resolve().parent
    names = [str(p.relative_to(here.parent)) for p in here.rglob("*.py")]
    assert not [(n, k) for n in names for k in keywords if k in n]
