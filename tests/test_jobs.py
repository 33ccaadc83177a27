"""The cluster jobs as KubeRay runs them, on this machine: a real ``ray job submit`` of the entrypoints
in ``k8s/`` to a local Ray head that the test starts.

The head is started bare (no MLflow or S3 settings in its environment) from the repository root,
as a KubeRay head starts in the image's app folder, and jobs are submitted without a working_dir
(a RayJob cannot upload one). What the pods get from the ConfigMap ``hotdog-env`` and the Secret
``hotdog-s3`` comes in the job's runtime env, with two local stand-ins: moto's S3 server on
loopback (bucket ``hotdog-data``, as the manifests name it) and an MLflow server started with the
command of ``k8s/mlflow.yaml``. The only changes to the entrypoints are options appended to make the
run laptop-sized and CPU-only (later ``--set`` wins).

These tests run last (see conftest): the head is a second Ray instance, so the in-process one
is shut down first (two at once confuse Train's placement-group cleaner: "Found multiple active Ray instances").
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import BUCKET, free_port
from tests.helpers import k8s_manifest as _manifest
from tests.helpers import ray_client_env as _env
from tests.helpers import wait_http as _wait_http

pytestmark = [pytest.mark.ray_head, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BIN = Path(sys.executable).parent

SMALL = [
    "data.image_size=16",
    "model.name=first_cnn",
    "model.filters=4",
    "train.batch_size=8",
    "train.epochs=1",
    "train.num_workers=1",
    "train.use_gpu=false",
    "train.cpus_per_worker=0.5",
    "score.num_actors=1",
    "score.gpus_per_actor=0",
    "score.batch_size=8",
    "monitor.metrics_linger_s=0",  # the scoring manifest keeps its metrics up 45 s for Prometheus
]


@pytest.fixture(scope="module")
def ray_head():
    """A local head started with ``ray start`` in the repository root; yields the job API address."""
    import ray

    ray.shutdown()
    port, dashboard = free_port(), free_port()
    env = _env(bare=True)
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--num-gpus=0",
        ],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=180,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_http(f"{address}/api/version", 60)  # the job API comes up a little after `ray start` returns
        yield address
    finally:
        # --force: nothing on the head needs a graceful end, and a graceful one waits about 10 s.
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@dataclass
class Platform:
    """What the manifests expect around them, on loopback."""

    runtime_env: dict
    mlflow_uri: str
    date: dt.date
    incoming: list[str]


def test_mlflow_server_answers_its_service_names_and_refuses_others(mlflow_server):
    """MLflow checks the Host header: in-cluster clients use the Service's DNS names."""

    def status(host: str) -> int:
        request = urllib.request.Request(
            f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
        )
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    for host in (
        "mlflow:5000",
        "mlflow.hotdog:5000",
        "mlflow.hotdog.svc.cluster.local:5000",
        "localhost:5000",
    ):
        assert status(host) == 200, host
    assert status("mlflow.evil.example.com") == 403  # the DNS-rebinding guard is on


@pytest.fixture(scope="module")
def platform(s3_server, mlflow_server, image_tree):
    from hotdog_ray.score import run_date

    s3_server.upload_dir(image_tree.root, BUCKET, "hotdog")  # data.root of the RayJobs
    date = run_date("yesterday")  # the scoring RayJob's --date
    incoming = []
    for path in sorted((image_tree.root / "test").rglob("*.*")) + [
        image_tree.root / "train" / "cat" / "empty.jpg"
    ]:
        key = f"incoming/{date.isoformat()}/{path.parent.name}_{path.name}"
        s3_server.client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
        incoming.append(key)
    settings = _manifest("config.yaml", "ConfigMap")["data"]
    credentials = _manifest("secrets.example.yaml", "Secret")["stringData"]
    env_vars = {
        **settings,
        "MLFLOW_TRACKING_URI": mlflow_server,  # the Service `mlflow`, here
        "AWS_ENDPOINT_URL": s3_server.endpoint,  # the ConfigMap's S3-compatible option
        **{k: "testing" for k in credentials},
    }
    return Platform({"env_vars": env_vars}, mlflow_server, date, incoming)


def _submit(address: str, entrypoint: str, runtime_env: dict) -> str:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        *shlex.split(entrypoint),
    ]  # as KubeRay's submitter pod: its shell splits the entrypoint
    proc = subprocess.run(cmd, env=_env(bare=True), cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower()
    return out


def _entrypoint(file: str, kind: str = "RayJob") -> str:
    return " ".join(_manifest(file, kind)["spec"]["entrypoint"].split())


def test_train_and_score_rayjobs_run_on_a_ray_head(ray_head, platform, s3_server):
    """rayjob-train.yaml then score-rayjob.yaml: the model trained, tracked and registered on the
    MLflow server (artifacts in S3) is the one that scores yesterday's incoming images into Parquet."""
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    overrides = " ".join(f"--set {o}" for o in SMALL)
    out = _submit(ray_head, f"{_entrypoint('rayjob-train.yaml')} {overrides}", platform.runtime_env)
    run_id = re.search(r"MLflow run id ([0-9a-f]{32})", out).group(1)
    client = MlflowClient(platform.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.root"] == f"s3://{BUCKET}/hotdog"  # the manifest's, not a local path
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server to S3
    assert float(run.data.tags["ray_cluster_cpus"]) == 2.0  # ran on the head's cluster
    (version,) = client.search_model_versions(f"run_id='{run_id}'")
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.startswith("runs/") for k in keys), "checkpoints on S3 (train.storage_path)"
    assert any(k.startswith("mlflow-artifacts/") for k in keys), "the model's files in the artifact bucket"

    out = _submit(ray_head, f"{_entrypoint('score-rayjob.yaml')} {overrides}", platform.runtime_env)
    prefix = f"predictions/date={platform.date.isoformat()}/"
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    tables = [
        pq.read_table(io.BytesIO(s3_server.client.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
        for k in keys
        if k.endswith(".parquet")
    ]
    rows = [r for t in tables for r in t.to_pylist()]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in rows) == sorted(
        k.rsplit("/", 1)[1] for k in platform.incoming
    )
    assert {r["model_version"] for r in rows} == {str(version.version)}
    assert [r["path"] for r in rows if r["error"]] == [
        p for p in (r["path"] for r in rows) if p.endswith("cat_empty.jpg")
    ]


def _start_sample_training(
    address: str, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`ray job submit --working-dir <checkout> -- python jobs/train.py --config configs/sample.yaml`."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
    cmd += ["python", "jobs/train.py", "--config", "configs/sample.yaml", *options]
    return subprocess.Popen(
        cmd, env=env or _env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def missing_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs") / "nothing"


@pytest.fixture(scope="module")
def refused(ray_head, missing_root) -> dict[str, subprocess.CompletedProcess]:
    """The two submissions below, sent at once (each spends most of its time waiting for its job);
    stopped by process id if they outlive the wait."""
    started = {
        "missing data": _start_sample_training(ray_head, "--set", f"data.root={missing_root}"),
        # The README's first cluster command, as a new user types it (no MLFLOW_TRACKING_URI).
        "as typed": _start_sample_training(
            ray_head, env={k: v for k, v in _env().items() if k != "MLFLOW_TRACKING_URI"}
        ),
    }
    try:
        outputs = {name: proc.communicate(timeout=300)[0] for name, proc in started.items()}
        return {
            name: subprocess.CompletedProcess(proc.args, proc.returncode, outputs[name])
            for name, proc in started.items()
        }
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_failing_job_fails_the_submission_with_the_reason(refused, missing_root):
    proc = refused["missing data"]
    assert proc.returncode != 0
    assert "failed" in proc.stdout.lower()
    assert str(missing_root) in proc.stdout  # the job's own error names what is missing


def test_a_job_that_would_lose_its_results_refuses_to_start(refused):
    """The README's first cluster command, as a new user types it: Ray runs the job from its own
    copy of the working directory, without data/ (.gitignored) and deleted with the session, so
    the default SQLite store and relative paths would vanish: the job says so and does nothing."""
    proc = refused["as typed"]
    out = proc.stdout
    assert proc.returncode != 0 and "failed" in out.lower()
    assert "runs from Ray's copy of its working directory" in out
    assert "set MLFLOW_TRACKING_URI" in out  # the default sqlite:///mlflow.db
    assert "train.storage_path=ray_results is a relative local path" in out
    assert "data.root=data/sample is not in the job's files" in out and ".gitignored" in out
    assert "Epoch" not in out and "epoch 1/" not in out  # refused before any work
