"""The production MLflow store: ``mlflow server`` on a real PostgreSQL, reached with the URI form the
operations guide and ``k8s/secrets.example.yaml`` give (``postgresql://...``), used end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import serve_app, set_args

REPO = Path(__file__).resolve().parents[1]


def test_documented_postgres_uri_is_the_one_the_guide_and_secret_give():
    for guide in ("tracking.md", "cluster.md"):
        assert "--backend-store-uri postgresql://" in (REPO / "docs" / guide).read_text(), guide
    secret = (REPO / "k8s" / "secrets.example.yaml").read_text()
    assert "MLFLOW_BACKEND_STORE_URI: postgresql://" in secret


@pytest.mark.e2e
def test_train_promote_and_serve_against_mlflow_on_postgres(
    ray_session, shared_serve, postgres, mlflow_server, tmp_path
):
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (Debian's package postgresql; CI installs it)")
    from hotdog_ray.config import load_config
    from hotdog_ray.prepare import write_sample
    from hotdog_ray.train import run_training

    write_sample(str(tmp_path / "data"))
    overrides = [
        f"data.root={tmp_path / 'data'}",
        f"tracking.uri={mlflow_server}",
        f"train.storage_path={tmp_path / 'checkpoints'}",
        f"data.cache.root={tmp_path / 'cache'}",
        "tracking.experiment=postgres",
        "tracking.registered_model=postgres-digits",
        "train.num_workers=0",
        "train.epochs=1",
    ]
    cfg = load_config(REPO / "configs" / "sample.yaml", overrides)
    outcome = run_training(cfg)

    promote = subprocess.run(
        [sys.executable, "-m", "hotdog_ray", "promote", "-c", "configs/sample.yaml"]
        + set_args(overrides)
        + ["--force", str(outcome.model_version)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert promote.returncode == 0, promote.stderr[-3000:]

    digit = sorted((tmp_path / "data" / "test").rglob("*.png"))[0]
    with serve_app(cfg, "postgres", shared_serve) as url:
        answer = requests.post(
            f"{url}/predict", data=digit.read_bytes(), headers={"Content-Type": "image/png"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        out = answer.json()
        assert out["model"] == {"name": "postgres-digits", "version": str(outcome.model_version)}
        assert out["label"] in {folder.name for folder in (tmp_path / "data" / "test").iterdir()}
