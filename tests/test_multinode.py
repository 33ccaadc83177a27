"""Beyond one machine: a Ray cluster of several nodes on this one (``ray.cluster_utils.Cluster``:
a head with no CPUs for the driver, and worker nodes that each run their own raylet and can be
removed on their own, as a lost machine or a reclaimed spot instance is), with moto's S3 and an
MLflow tracking server as the stores the nodes share. A step of its own (``pytest -m multinode``, the
second half of the README's test command; the default run deselects it), so the suite's main run
stays within its time budget; within any run it comes last (see conftest), after the shared Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from hotdog_ray.config import load_config
from hotdog_ray.registry import client
from hotdog_ray.train import run_training
from tests.helpers import HoldThenPace, mlflow_store, wait_until

pytestmark = pytest.mark.multinode

# A Train worker of 2 CPUs leaves each node a whole CPU for Ray Data's tasks, and only one fits.
NODE_CPUS = 3


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (GCS, the driver; no CPUs) and two worker nodes of 2 CPUs; stopped by process id."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # Ray Train's elastic policy learns of a lost node up to 20 s late and may first ask for a group
    # that no longer fits: give up on such a start after 15 s rather than a minute (inherited by the
    # node processes started below).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "15"
    # The GCS declares a node dead after failed health checks: 3 missed 1 s checks here rather than
    # Ray's default of 5 missed 3 s checks, so each test's lost node is noticed in seconds.
    health = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 3000,
        "health_check_failure_threshold": 3,
    }
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    nodes = [c.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
    c.wait_for_nodes()
    c.connect()
    try:
        yield SimpleNamespace(cluster=c, nodes=nodes)
    finally:
        ray.shutdown()
        c.shutdown()  # kills every process it started, by the handles it kept
        os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)


def _training_config(s3_server, image_tree, mlflow_server, *overrides: str):
    """A tiny training run whose data and checkpoints are on S3 and whose run is on the MLflow server."""
    bucket = s3_server.bucket("multinode")
    root = s3_server.upload_dir(image_tree.root, bucket, "data")
    common = [
        f"data.root={root}",
        "data.image_size=16",
        "model.name=first_cnn",
        "model.filters=4",
        "train.batch_size=8",
        "train.learning_rate=0.01",
        f"train.storage_path=s3://{bucket}/runs",
        f"tracking.uri={mlflow_server}",
    ]
    return load_config(None, [*common, *overrides])


def _in_background(work: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    """``work()`` in a thread (the test changes the cluster meanwhile): the thread, and the dict that
    gets its outcome (``out``) or its exception (``error``)."""
    result: dict = {}

    def run() -> None:
        try:
            result["out"] = work()
        except Exception as exc:  # noqa: BLE001 - reported by the test's assertions
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _train_in_background(cfg, run_name: str, callback) -> tuple[threading.Thread, dict]:
    """``run_training`` in a thread: see :func:`_in_background`."""
    return _in_background(
        lambda: run_training(
            cfg, run_name=run_name, register=False, evaluate_test=False, callbacks=[callback]
        )
    )


def _replace_node(cluster, node_id: str, pause_s: float = 0.0, marker: Path | None = None) -> None:
    """Removes the node ``node_id`` at once, as a lost machine goes (then writes ``marker``), and
    after ``pause_s`` a new node of the same size joins in its place."""
    index = next(i for i, n in enumerate(cluster.nodes) if n.node_id == node_id)
    cluster.cluster.remove_node(cluster.nodes[index], allow_graceful=False)
    if marker is not None:
        marker.write_text("1")
    time.sleep(pause_s)  # how long the cluster runs short of the node
    cluster.nodes[index] = cluster.cluster.add_node(num_cpus=NODE_CPUS)


def _alive(cluster, class_name: str = "") -> list:
    """This cluster's live actors whose class name contains ``class_name`` (Tune's trials are
    ``ImplicitFunc`` in one run, ``wrap_function.<locals>.ImplicitFunc`` in another), asked of its
    own dashboard: with no address the state API picks whichever Ray on the machine it finds first."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=f"http://{cluster.cluster.webui_url}", filters=[("state", "=", "ALIVE")], limit=10_000
    )
    return [a for a in actors if class_name in a.class_name]


def _train_workers(cluster) -> list:
    return _alive(cluster, "RayTrainWorker")


def test_elastic_training_goes_on_without_a_lost_node_and_grows_back(
    cluster, s3_server, image_tree, tmp_path, mlflow_server
):
    """``train.num_workers: [1, 2]``, one worker per node: a node is removed after epoch 1 and none
    replaces it, so the run restarts from its S3 checkpoint on the one worker left; a node then joins
    and the run restarts from its latest checkpoint with two workers again. Every epoch is trained and
    recorded once (one MLflow point per epoch), and each epoch says how many workers trained it.
    (A fixed-size run that loses a node goes through the same restart from the checkpoint.)"""
    epochs = 10
    cfg = _training_config(
        s3_server,
        image_tree,
        mlflow_server,
        f"train.epochs={epochs}",
        "train.num_workers=[1, 2]",
        "train.cpus_per_worker=2",
        "train.elastic_resize_interval_s=1",
        "train.max_failures=4",
    )
    thread, result = _train_in_background(cfg, "elastic", HoldThenPace(0, tmp_path, full=2, pause_s=4.0))
    _wait_for(tmp_path / "reported", thread, result, 180)
    assert len({w.node_id for w in _train_workers(cluster)}) == 2
    cluster.cluster.remove_node(cluster.nodes[1], allow_graceful=False)
    (tmp_path / "removed").write_text("1")
    _wait_for(tmp_path / "small", thread, result, 180)  # an epoch trained by the one worker left
    assert len(_train_workers(cluster)) == 1
    cluster.nodes[1] = cluster.cluster.add_node(num_cpus=NODE_CPUS)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result
    out = result["out"]
    assert [h["epoch"] for h in out.history] == list(range(epochs))
    workers = [h["workers"] for h in out.history]
    assert workers[0] == 2 and 1 in workers and workers[-1] == 2, workers  # shrank, then grew back
    mlflow = client(cfg.tracking)
    history = mlflow.get_metric_history(out.run_id, "workers")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(map(float, workers)))
    assert sorted(m.step for m in mlflow.get_metric_history(out.run_id, "val_loss")) == list(range(epochs))


def _on_two_nodes(cluster, class_name: str) -> list | None:
    """The live actors of ``class_name`` when they run on two nodes, else None."""
    found = [a for a in _alive(cluster, class_name) if a.node_id is not None]
    return found if len({a.node_id for a in found}) == 2 else None


def _wait_for(marker, thread: threading.Thread, result: dict, seconds: float) -> None:
    def there() -> bool:
        assert thread.is_alive(), (marker.name, result)
        return marker.exists()

    wait_until(there, timeout=seconds, message=lambda: (marker.name, result))


def test_local_stores_are_refused_on_several_nodes_unless_shared(cluster, image_tree, tmp_path):
    """Workers, trials and scoring tasks on other nodes would write to their own disks."""
    from hotdog_ray.errors import ConfigError
    from hotdog_ray.score import check_cluster

    cfg = load_config(
        None,
        [
            f"data.root={image_tree.root}",
            f"train.storage_path={tmp_path}/runs",
            f"tracking.uri={mlflow_store(tmp_path)}",
        ],
    )
    with pytest.raises(ConfigError, match=r"train.storage_path=.* is a local path.* 3 nodes") as err:
        run_training(cfg, run_name="local")
    assert "train.shared_storage=true" in str(err.value) and not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="score.shared_output"):
        check_cluster(cfg, str(tmp_path / "scores"))
    shared = cfg.model_copy(update={"score": cfg.score.model_copy(update={"shared_output": True})})
    check_cluster(shared, str(tmp_path / "scores"))  # said to be on a disk every node mounts
    check_cluster(cfg, "s3://bucket/scores")


def test_a_sweep_spreads_over_nodes_and_a_lost_nodes_trial_restarts_from_its_checkpoint(
    cluster, s3_server, image_tree, tmp_path, mlflow_server
):
    """Two trials of 2 CPUs: one per node. After the first result, that trial's node is removed and a
    replacement joins: the trial restarts there from its S3 checkpoint in its own MLflow run, and each
    planned trial ends once, FINISHED, with one point per epoch."""
    from hotdog_ray.tracking import child_runs
    from hotdog_ray.tune import run_sweep
    from tests.helpers import HoldAfterFirstResult

    bucket = s3_server.bucket("sweep")
    root = s3_server.upload_dir(image_tree.root, bucket, "data")
    epochs = 3
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.image_size=16",
            "model.name=first_cnn",
            "train.batch_size=8",
            f"train.epochs={epochs}",
            "train.cpus_per_worker=2",
            "train.max_failures=2",
            f"train.storage_path=s3://{bucket}/sweeps",
            f"tracking.uri={mlflow_server}",
            "tune.num_samples=2",
            "tune.max_concurrent_trials=2",
            "tune.filters=[4]",
            "tune.asha=false",
            "tune.seed=1",
            "tune.promote=false",
        ],
    )
    thread, result = _in_background(
        lambda: run_sweep(cfg, name="spread", callbacks=[HoldAfterFirstResult(tmp_path)])
    )
    _wait_for(tmp_path / "reported", thread, result, 180)
    first = json.loads((tmp_path / "reported").read_text())
    # The second trial's process may still be starting when the first reports.
    trials = wait_until(
        lambda: _on_two_nodes(cluster, "ImplicitFunc"),
        timeout=60,
        interval=1,
        message=lambda: [(a.class_name, a.node_id) for a in _alive(cluster)],
    )
    (node_id,) = {a.node_id for a in trials if a.pid == first["pid"]}
    _replace_node(cluster, node_id, marker=tmp_path / "removed")
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result
    out = result["out"]
    assert [t["status"] for t in out.trials] == ["finished", "finished"]
    mlflow = client(cfg.tracking)
    children = child_runs(cfg.tracking, out.run_id)
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(t["trial_id"] for t in out.trials)
    for run in children:  # one run per trial, the restarted one included, one point per epoch
        assert run.info.status == "FINISHED"
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "val_loss")]
        assert sorted(steps) == list(range(epochs)), (run.data.tags["trial_id"], steps)


def test_serve_replicas_on_two_nodes_keep_answering_when_one_node_goes(cluster, tmp_path, mlflow_server):
    """Two replicas of 2 CPUs, one per node, under load at concurrency 8 from another process: a
    node is removed mid-run. At most the requests in flight on it fail, the app keeps answering,
    and a second replica runs again once a node joins."""
    from ray import serve

    from hotdog_ray.registry import set_alias
    from hotdog_ray.server.launch import deployment, wait_ready
    from tests.helpers import free_port, register_model, tiny_model, tiny_model_config
    from tests.imagegen import CLASSES

    port = free_port()
    cfg = tiny_model_config(
        tmp_path,
        f"serve.port={port}",
        "serve.autoscaling.min_replicas=2",
        "serve.autoscaling.max_replicas=2",
        "serve.cpus_per_replica=2",
        f"tracking.uri={mlflow_server}",
    )
    set_alias(cfg.tracking, register_model(cfg, tiny_model(CLASSES), CLASSES, name="spread")[1])
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name="hotdog", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url, timeout=120)

        def replicas() -> list:
            return _alive(cluster, "ServeReplica:hotdog")

        assert len({r.node_id for r in replicas()}) == 2
        requests, concurrency = 3000, 8
        loadgen = [sys.executable, str(Path(__file__).parents[1] / "bench" / "loadgen.py"), f"{url}/predict"]
        loadgen += ["--requests", str(requests), "--concurrency", str(concurrency), "--json"]
        load = subprocess.Popen(loadgen, stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(4)  # four seconds of load before the loss
            assert load.poll() is None, "the load ended before a node could be removed"
            _replace_node(cluster, replicas()[0].node_id, pause_s=2)
            out, _ = load.communicate(timeout=300)
        finally:
            if load.poll() is None:
                load.kill()
        stats = json.loads(out)
        print(f"serve across nodes, one lost under load: {json.dumps(stats)}")
        assert stats["errors"] <= concurrency and stats["ok"] + stats["errors"] == requests, stats
        wait_until(
            lambda: len({r.node_id for r in replicas()}) == 2 and wait_ready(url, timeout=5),
            timeout=180,
            interval=1,
            message=serve.status,
        )
    finally:
        serve.shutdown()


def test_scoring_loses_a_model_actors_node_and_still_accounts_for_every_file(
    cluster, s3_server, tmp_path, mlflow_server
):
    """Two model actors of 2 CPUs, one per node, score images from S3 to S3; as soon as they are up,
    one actor's node is removed and a new node joins. The run either publishes exactly one row per
    input (Ray Data restarts the actor and retries its batches) or fails saying so and publishes
    nothing: never a partition with rows missing or doubled."""
    import pyarrow.dataset as pads

    from hotdog_ray import storage
    from hotdog_ray.errors import ScoreError
    from hotdog_ray.registry import set_alias
    from hotdog_ray.score import score
    from tests.helpers import register_model, tiny_model, tiny_model_config
    from tests.imagegen import CLASSES, LEVELS, encode

    folder, files = tmp_path / "incoming", 240
    folder.mkdir()
    for i in range(files):
        cls = CLASSES[i % len(CLASSES)]
        (folder / f"{cls}_{i}.png").write_bytes(encode(LEVELS[cls], "RGB", "PNG", (24, 24), seed=i))
    bucket = s3_server.bucket("scoring")
    source = s3_server.upload_dir(folder, bucket, "incoming/2026-11-30")
    cfg = tiny_model_config(
        tmp_path,
        "score.num_actors=2",
        "score.cpus_per_actor=2",
        "score.batch_size=2",
        "data.files_per_task=8",
        f"tracking.uri={mlflow_server}",
    )
    set_alias(cfg.tracking, register_model(cfg, tiny_model(CLASSES), CLASSES, name="spread-scoring")[1])
    output = f"s3://{bucket}/predictions"
    thread, result = _in_background(lambda: score(cfg, input=source, output=output, date="2026-11-30"))

    def actors_on_two_nodes() -> list | None:
        assert thread.is_alive(), result
        return _on_two_nodes(cluster, "Scorer")

    actors = wait_until(actors_on_two_nodes, timeout=180, interval=0.05, message=lambda: result)
    _replace_node(cluster, actors[0].node_id)
    thread.join(timeout=300)
    assert not thread.is_alive()
    final = storage.resolve(f"{output}/date=2026-11-30")
    if "error" in result:  # failed clearly, nothing published
        assert isinstance(result["error"], ScoreError), result
        assert final.fs.get_file_info(final.path).type.name == "NotFound"
        print(f"scoring across nodes, one lost: failed clearly ({result['error']})")
        return
    summary = result["out"]
    assert (summary.files, summary.scored) == (files, files)
    table = pads.dataset(final.path, filesystem=final.fs, format="parquet").to_table()
    paths = table["path"].to_pylist()
    assert len(paths) == files and len(set(paths)) == files  # one row per input, none doubled
    print(f"scoring across nodes, one lost: {summary.files} files, one row each, {summary.seconds:.1f} s")
