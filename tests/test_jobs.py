"""``jobs/train.py`` as a real ``ray job submit`` to a local Ray head that the test starts.

These tests run last (see conftest): the head is a second Ray instance, so the in-process one
is shut down first (two at once confuse Train's placement-group cleaner, STACK-NOTES).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.ray_head

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    # The head's job drivers run `python` from PATH: make it this interpreter, which has the package.
    # Ray 2.60 clusters use token auth; the job client needs this to send the token (STACK-NOTES).
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_head():
    """A local head started with ``ray start``; yields the dashboard (job API) address."""
    import ray

    ray.shutdown()
    port, dashboard = free_port(), free_port()
    env = _env()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 60
        while True:  # the job API comes up a little after `ray start` returns
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # answering (401 without the token) is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        subprocess.run([str(BIN / "ray"), "stop"], env=env, capture_output=True, timeout=120)


def test_train_job_submitted_to_a_ray_head_trains_tracks_and_registers(ray_head, image_tree, tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    overrides = [
        f"data.root={image_tree.root}", "data.image_size=16", "model.name=first_cnn", "model.filters=4",
        "train.batch_size=8", "train.epochs=2", "train.cpus_per_worker=0.5",
        f"train.storage_path={tmp_path / 'ckpt'}", f"tracking.uri=sqlite:///{db}",
    ]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
           "python", "jobs/train.py", "--config", "configs/sample.yaml",
           *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()

    run_id = re.search(r"MLflow run id ([0-9a-f]{32})", out).group(1)
    assert re.search(r"test accuracy \d\.\d{4}, balanced accuracy \d\.\d{4}", out)
    client = MlflowClient(f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "first_cnn"
    assert len(client.get_metric_history(run_id, "val_loss")) == 2
    versions = client.search_model_versions(f"run_id='{run_id}'")
    assert len(versions) == 1
    # The job ran on the head's cluster, not a private Ray started by the driver.
    assert float(run.data.tags["ray_cluster_cpus"]) == 2.0


def test_a_failing_job_fails_the_submission_with_the_reason(ray_head, tmp_path):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
           "python", "jobs/train.py", "--config", "configs/sample.yaml", "--set", f"data.root={tmp_path / 'nothing'}"]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "failed" in out.lower()
    assert str(tmp_path / "nothing") in out  # the job's own error names what is missing
