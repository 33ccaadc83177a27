"""Which MLflow store a config names, and that runs never leak into another config's store."""

from __future__ import annotations

import os
from pathlib import Path

from hotdog_ray.config import load_config
from hotdog_ray.tracking import end_run, start_run, tracking_uri


def test_store_is_config_then_environment_then_local_sqlite(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(load_config()) == f"sqlite:///{tmp_path / 'mlflow.db'}"  # absolute: workers agree

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(load_config()) == "http://mlflow.internal:5000"
    assert tracking_uri(load_config(None, ["tracking.uri=sqlite:///runs.db"])) == f"sqlite:///{tmp_path / 'runs.db'}"


def test_two_stores_in_one_process_stay_apart(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = (load_config(None, [f"tracking.uri=sqlite:///{tmp_path / name}"]) for name in ("a.db", "b.db"))
    run_a = start_run(a, run_name="a", tags={"which": "a"})
    end_run(a, run_a)
    run_b = start_run(b, run_name="b", tags={"which": "b"})
    end_run(b, run_b, status="FAILED")

    assert "MLFLOW_TRACKING_URI" not in os.environ  # no process-wide state left behind
    for cfg, run_id, status in ((a, run_a, "FINISHED"), (b, run_b, "FAILED")):
        client = MlflowClient(tracking_uri(cfg))
        runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        assert runs[0].info.status == status and runs[0].data.params["model.name"] == cfg.model.name
    assert Path(tmp_path / "a.db").exists() and Path(tmp_path / "b.db").exists()
