"""Shared fixtures: one Ray instance per session, a real S3 endpoint on loopback, generated images."""

from __future__ import annotations

import os

# MLflow's telemetry client, when it cannot fetch its config (no network here), removes an
# environment variable from a background thread; a request built meanwhile in another thread
# iterates os.environ and fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID' (seen once in CI, in a
# training thread's runs/create). Off for the tests, their Ray workers and their MLflow servers.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The tests' `mlflow ui` and `mlflow server` run without MLflow's job runner, as k8s/mlflow.yaml
# runs the server: its huey consumers serve GenAI features this project does not use.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
os.environ.setdefault("MLFLOW_WORKERS", "1")  # `mlflow ui`'s web workers (4 by default) for one client
# Ray's processes report metrics every 2 s instead of 10: the alert and metrics tests wait for
# reports (and for the agent's eviction of unrefreshed gauges, two reports), five times less.
# Telemetry reads the interval Ray runs with (compat.metrics_report_interval_s), so the code path is
# the production one. Every Ray process of the run (the session's, `ray start` heads, subprocesses)
# inherits it.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
import io
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (
    BUCKET,
    SharedServe,
    free_port,
    k8s_manifest,
    mlflow_store,
    postgres_bin,
    postgres_database,
    ray_client_env,
    wait_http,
)
from tests.imagegen import write_image_tree

if TYPE_CHECKING:
    from hotdog_ray.config import Config
    from hotdog_ray.predict import Predictor
    from hotdog_ray.train import TrainOutcome


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run: starting Ray costs seconds, and two instances on one
    machine confuse Train's placement-group cleaner ("Found multiple active Ray instances")."""
    import ray

    from hotdog_ray.config import ServeSettings
    from hotdog_ray.runtime import init_ray
    from hotdog_ray.server.launch import set_serve_env

    # Serve's tests run as `hotdog serve` does by default (HAProxy, throughput mode), with a short
    # drain (the env reaches the `hotdog serve` subprocess too).
    set_serve_env(ServeSettings(), drain_s=1)
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_serve(ray_session) -> Iterator[SharedServe]:
    """One Serve instance for the session's in-process apps (see :class:`tests.helpers.SharedServe`)."""
    shared = SharedServe()
    yield shared
    shared.stop()


@pytest.fixture()
def serve_stopped(shared_serve) -> None:
    """No Serve running on the session's Ray: for a test whose subprocess starts Serve itself on
    its own port (Serve's HTTP options are one per instance)."""
    shared_serve.stop()


@pytest.fixture()
def joining_env(ray_session) -> dict[str, str]:
    """The environment for a command that joins the session's Ray instead of starting its own:
    a Ray start costs a subprocess 6-8 s on 2 cores, and stopping one as much again."""
    address = ray_session.get_runtime_context().gcs_address
    # Ray 2.60 runs local clusters with token auth: a joining driver must say so to send the token.
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}


@dataclass
class S3:
    endpoint: str
    client: object

    def bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(local).as_posix()}"
                self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}"


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server speaking real HTTP on 127.0.0.1, with AWS_ENDPOINT_URL pointing at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        yield S3(endpoint, client)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3(s3_server, monkeypatch):
    """The session's S3 server, with its environment restored after each test."""
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    """A small dataset with odd-mode images and planted bad files (see tests/imagegen.py)."""
    root = tmp_path_factory.mktemp("images")
    return write_image_tree(root)


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray head run last, after the shared in-process Ray is done."""
    items.sort(
        key=lambda item: any(item.get_closest_marker(m) is not None for m in ("ray_head", "multinode"))
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[str | None]:
    """A real PostgreSQL for the session (the MLflow store of the operations guide and of k8s/), or
    None where Debian's package is not installed; `.ci/run` installs it and sets
    HOTDOG_REQUIRE_POSTGRES, so CI never runs without."""
    if postgres_bin() is None:
        if os.environ.get("HOTDOG_REQUIRE_POSTGRES"):
            pytest.fail("HOTDOG_REQUIRE_POSTGRES is set and PostgreSQL is not installed")
        yield None
        return
    with postgres_database() as uri:
        yield uri


@pytest.fixture(scope="module")
def mlflow_server(s3_server, postgres, tmp_path_factory):
    """The tracking server, run with k8s/mlflow.yaml's own command and environment (artifacts to S3,
    the store PostgreSQL through the Secret's URI form, SQLite where no PostgreSQL is installed),
    for the module; stopped by process id."""
    deployment = k8s_manifest("mlflow.yaml", "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    assert "--host 0.0.0.0 --port 5000" in script
    port = free_port()
    script = script.replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")  # loopback here
    try:
        s3_server.client.create_bucket(Bucket=BUCKET)
    except s3_server.client.exceptions.BucketAlreadyOwnedByYou:  # another module's server made it
        pass
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # Stand-ins for the optional Secrets: a store of our own, moto's credentials.
    env["MLFLOW_BACKEND_STORE_URI"] = postgres or mlflow_store(tmp_path_factory.mktemp("mlflow"))
    env.update(
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    proc = subprocess.Popen(
        [*container["command"], script],
        env={**ray_client_env(bare=True), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, proc)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Digits:
    """The digits sample trained by the job (the champion of its own store) and the pagoda photo."""

    cfg: "Config"
    outcome: "TrainOutcome"
    predictor: "Predictor"
    test_files: list[Path]
    pagoda: bytes


@pytest.fixture(scope="session")
def digits(ray_session, tmp_path_factory) -> Digits:
    """``configs/sample.yaml`` trained for 8 epochs in the driver (calibration, OOD bank and all),
    registered and promoted; shared by the OOD and gate tests."""
    from sklearn.datasets import load_sample_image

    from hotdog_ray import registry
    from hotdog_ray.config import load_config
    from hotdog_ray.predict import Predictor
    from hotdog_ray.prepare import write_sample
    from hotdog_ray.train import run_training

    tmp = tmp_path_factory.mktemp("digits")
    write_sample(str(tmp / "data"))
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "sample.yaml",
        [
            f"data.root={tmp / 'data'}",
            f"tracking.uri={mlflow_store(tmp)}",
            f"train.storage_path={tmp / 'checkpoints'}",
            f"data.cache.root={tmp / 'cache'}",
            f"prediction_log.location={tmp / 'answers'}",
            "prediction_log.flush_interval_s=0.5",
            "prediction_log.images=true",  # feedback becomes training data (tests/test_retrain.py)
            f"rollout.store={tmp / 'rollout'}",
            "train.num_workers=0",  # the loop in the driver: no worker group to start
            "train.epochs=8",
        ],
    )
    outcome = run_training(cfg)
    registry.set_alias(cfg.tracking, outcome.model_version)
    return Digits(
        cfg=cfg,
        outcome=outcome,
        predictor=Predictor.from_config(cfg, device="cpu"),
        test_files=sorted((tmp / "data" / "test").rglob("*.png")),
        pagoda=jpeg(load_sample_image("china.jpg")),
    )
