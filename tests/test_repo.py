"""The repository keeps its promises: two Quickstart commands, CI runs the second verbatim."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

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


def test_every_install_uses_the_constraints_file_which_pins_what_pyproject_asks_for():
    for command in quickstart_commands():
        assert "pip install -q -c constraints.txt -e " in command, command
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_canonical(name)] = version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pyproject["dependencies"] + [
        r for extra in pyproject["optional-dependencies"].values() for r in extra
    ]
    missing = [r for r in wanted if _canonical(re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0]) not in pins]
    assert not missing, f"not pinned in constraints.txt (regenerate it, see its header): {missing}"


def test_every_third_party_module_the_code_imports_is_declared_in_pyproject():
    """Imports of the package, tests, benchmarks, jobs and the Serve config against the distributions
    pyproject.toml declares (dependencies and every extra): an undeclared one works here only because
    something else happened to install it."""
    import sys
    from importlib.metadata import packages_distributions

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        _canonical(re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0])
        for r in pyproject["dependencies"]
        + [r for e in pyproject["optional-dependencies"].values() for r in e]
    }
    folders = ("hotdog_ray", "tests", "bench", "jobs", "serving")
    local = set(folders) | {f.stem for d in folders for f in (ROOT / d).rglob("*.py")}
    distributions = packages_distributions()
    undeclared = {}
    for folder in folders:
        for file in (ROOT / folder).rglob("*.py"):
            if "kuberay-crds" in file.parts:
                continue
            for module in _imported_modules(file):
                if module in sys.stdlib_module_names or module in local:
                    continue
                names = {_canonical(d) for d in distributions.get(module, [module])}
                if not names & declared:
                    undeclared.setdefault(module, file.relative_to(ROOT).as_posix())
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def _imported_modules(file: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_marker_the_docs_select_by_is_registered_and_carried_by_tests(pytestconfig):
    """The documented quick run (`pytest -m 'not e2e and not multinode'`) deselects by marker name;
    pytest accepts an unknown name there and silently selects every test, so a renamed marker
    would turn the quick run into the whole suite without a word."""
    registered = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    texts = [(ROOT / "README.md").read_text(), (ROOT / "docs" / "development.md").read_text()]
    expressions = {e for text in texts for e in re.findall(r"pytest -m '([^']+)'", text)}
    assert expressions, "the docs name no -m selection"
    names = {w for e in expressions for w in re.findall(r"\w+", e)} - {"and", "or", "not"}
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in names:
        assert name in registered, f"-m selects by {name!r}, which pyproject does not register"
        assert f"pytest.mark.{name}" in tests, f"no test is marked {name!r}"
