"""The import rule: which modules load torch, Ray or MLflow, checked in fresh interpreters, and
the linter's rules for it in pyproject.toml."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "ray", "mlflow", "onnx", "onnxruntime")


def loaded_after(statement: str) -> list[str]:
    """The heavy libraries a fresh interpreter holds after running ``statement``."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_config_registry_and_tracking_import_without_torch():
    loaded = loaded_after("import hotdog_ray.config, hotdog_ray.registry, hotdog_ray.tracking")
    assert "torch" not in loaded and "ray" not in loaded


@pytest.mark.parametrize(
    "module, allowed",
    [
        ("hotdog_ray.cli", []),  # hotdog --help answers at once (tests/test_cli.py: no pydantic either)
        ("hotdog_ray.config", []),
        ("hotdog_ray.images", []),  # Ray Data decoding tasks start without torch
        ("hotdog_ray.storage", []),
        ("hotdog_ray.zoo", []),
        ("hotdog_ray.scorer", ["onnxruntime"]),  # the ONNX Runtime scoring actor
        # Processes that start often: a recipe CNN's replica and training worker load neither
        # torchvision (only transfer models need it) nor onnx (only an export checks a graph).
        ("hotdog_ray.server.replica", ["mlflow", "onnxruntime", "ray", "torch"]),
        ("hotdog_ray.loop", ["ray", "torch"]),
    ],
)
def test_light_modules_stay_light(module, allowed):
    assert sorted(loaded_after(f"import {module}")) == sorted(allowed)


def test_the_linter_enforces_the_rule():
    """Heavy libraries are banned at module level except in the allow-listed modules, and imports
    inside functions are flagged (a deliberate one carries a noqa with its reason)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"TID253", "PLC0415"} <= set(lint["select"])
    assert set(lint["flake8-tidy-imports"]["banned-module-level-imports"]) >= set(HEAVY)
    allowed = " ".join(k for k, v in lint["per-file-ignores"].items() if "TID253" in v)
    for light in ("config", "storage", "images", "cli", "scorer", "zoo"):
        assert light not in allowed, light
    bare = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "hotdog_ray").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "noqa: PLC0415" in line and not line.split("noqa: PLC0415", 1)[1].strip(" -")
    ]
    assert bare == [], "a lazy import without its reason"
