"""Beyond one machine: a Ray cluster of several nodes on this one (``ray.cluster_utils.Cluster``:
a head with no CPUs for the driver, and worker nodes that each run their own raylet and can be
removed on their own, as a lost machine or a reclaimed spot instance is), with moto's S3 as the
store the nodes share. Runs last (see conftest): the session's in-process Ray is shut down first.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from hotdog_ray.config import load_config
from hotdog_ray.registry import client
from hotdog_ray.train import run_training
from tests.helpers import HoldAfterEpoch, mlflow_store

pytestmark = pytest.mark.multinode

NODE_CPUS = 2


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (GCS, the driver; no CPUs) and two worker nodes of 2 CPUs; stopped by process id."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
    c.wait_for_nodes()
    c.connect()
    try:
        yield SimpleNamespace(cluster=c, nodes=nodes)
    finally:
        ray.shutdown()
        c.shutdown()  # kills every process it started, by the handles it kept


def _train_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def test_training_loses_a_node_and_resumes_on_its_replacement(cluster, s3_server, image_tree, tmp_path):
    """One worker per node (SPREAD); after epoch 1 is checkpointed to S3, a node is removed and a
    new one joins: the run restarts its worker group from the checkpoint and finishes, and the
    MLflow run has one point per epoch (nothing repeated in the record)."""
    bucket = s3_server.bucket("multinode")
    root = s3_server.upload_dir(image_tree.root, bucket, "data")
    cfg = load_config(
        None,
        [
            f"data.root={root}",
            "data.image_size=16",
            "model.name=first_cnn",
            "model.filters=4",
            "train.batch_size=8",
            "train.epochs=4",
            "train.learning_rate=0.01",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.placement_strategy=SPREAD",
            "train.max_failures=2",
            f"train.storage_path=s3://{bucket}/runs",
            f"tracking.uri={mlflow_store(tmp_path)}",
        ],
    )
    result: dict = {}

    def train() -> None:
        try:
            result["out"] = run_training(
                cfg,
                run_name="node-loss",
                register=False,
                evaluate_test=False,
                callbacks=[HoldAfterEpoch(0, tmp_path)],
            )
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not (tmp_path / "reported").exists():
        assert thread.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.1)
    before = _train_workers()
    assert len({w.node_id for w in before}) == 2  # one worker on each node
    cluster.cluster.remove_node(cluster.nodes[1], allow_graceful=False)  # the machine is gone
    (tmp_path / "removed").write_text("1")
    time.sleep(2)
    cluster.nodes[1] = cluster.cluster.add_node(num_cpus=NODE_CPUS)  # its replacement joins
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result
    out = result["out"]
    assert [h["epoch"] for h in out.history] == [0, 1, 2, 3]
    steps = [m.step for m in client(cfg.tracking).get_metric_history(out.run_id, "val_loss")]
    assert steps == [0, 1, 2, 3]
    from ray.util.state import list_actors

    # The worker group was started again (the two first workers and two more), not patched.
    everyone = list_actors(filters=[("class_name", "=", "RayTrainWorker")])
    assert len(everyone) >= 4 and {w.actor_id for w in before} <= {w.actor_id for w in everyone}
