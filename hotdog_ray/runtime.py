"""Starting or joining Ray, the same way from the CLI, the jobs and the tests, and checking that the
cluster can hold the work before it hangs waiting for resources."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.data import DataContext
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hotdog_ray import compat, storage
from hotdog_ray.errors import ConfigError

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    Idempotent: a second call, or a call inside a Ray job or a Tune trial, reuses the running instance.
    """
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": True}
        if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
        log.info("Ray resources: %s", ray.cluster_resources())
    quiet_ray_data()


_PROGRESS_BARS = False  # --progress: a person at a terminal asked for Ray Data's own bars


def show_progress_bars(on: bool = True) -> None:
    """Keep Ray Data's progress bars in this process (``hotdog score/inspect --progress``)."""
    global _PROGRESS_BARS
    _PROGRESS_BARS = on


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-execution banners swamp a terminal on small jobs and fill
    job logs; our progress lines say how far a job is. Applies to this process (the driver, or a
    Tune trial), unless :func:`show_progress_bars` asked for them."""
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = _PROGRESS_BARS
    ctx.print_on_execution_start = False


def on_this_node() -> dict[str, Any]:
    """Actor options that keep a job's helper actor (the skip log) on the driver's node: it
    lives and dies with the driver, and a worker node going away does not take it along."""
    return {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        ),
    }


def placement_problem(
    nodes: list[dict[str, float]], count: int, bundle: dict[str, float], data_cpus: float
) -> str | None:
    """Why ``count`` workers of ``bundle`` (each on one node) cannot run beside a data task of
    ``data_cpus`` on ``nodes`` (each node's resources), or None when they can (pure).

    Workers are packed as Ray Train packs them, onto the fullest node that still fits one: the
    tasks that read and decode images then need ``data_cpus`` free on some node, or they wait for
    good ("Cluster resources are not enough to run any task ... may hang forever").
    """
    free = [dict(n) for n in nodes]
    for placed in range(count):
        fits = [n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items())]
        if not fits:
            return f"only {placed} of the {count} workers fit on the nodes"
        node = min(fits, key=lambda n: n.get("CPU", 0.0))
        for k, v in bundle.items():
            node[k] -= v
    spare = max((n.get("CPU", 0.0) for n in free), default=0.0)
    if spare < data_cpus - 1e-9:
        return (
            f"the workers leave at most {spare:g} CPU free on any node, and the data tasks need {data_cpus:g}"
        )
    return None


def alive_nodes() -> list[dict[str, float]]:
    """The CPUs and GPUs of each live node of the cluster."""
    return [
        {k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_capacity(count: int, bundle: dict[str, float], data_cpus: float, keys: str) -> None:
    """Fail in seconds, naming ``keys`` and the numbers, when the cluster's nodes cannot hold
    ``count`` workers of ``bundle`` and still run data tasks; a job would otherwise hang."""
    nodes = alive_nodes()
    problem = placement_problem(nodes, count, bundle, data_cpus)
    if not problem:
        return
    present = ", ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n.items())) + "}" for n in nodes)
    asked = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    what = f"asked {count} x {{{asked}}} plus {data_cpus:g} CPU for reading and decoding"
    maximum = autoscaling_maximum()
    if maximum is not None and within(maximum, count, bundle, data_cpus):
        # The work's own resource requests make the autoscaler add nodes; Ray schedules it then.
        log.warning(
            "%s now (%s; nodes [%s]); the cluster autoscales up to %s: waiting for it to add nodes",
            problem,
            what,
            present,
            {k: v for k, v in sorted(maximum.items()) if k in ("CPU", "GPU")},
        )
        return
    raise ConfigError(
        f"{problem}: {what}, and the cluster's nodes have [{present}]; lower {keys}, or add nodes "
        "(the job would hang)"
    )


def autoscaling_maximum() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may bring up, or None on a fixed cluster."""
    try:
        return compat.autoscaling_max_resources()
    except Exception:  # noqa: BLE001 - without it the cluster counts as fixed
        log.debug("no autoscaler configuration readable", exc_info=True)
        return None


def within(maximum: dict[str, float], count: int, bundle: dict[str, float], data_cpus: float) -> bool:
    """Whether the cluster's maximum resources hold ``count`` bundles plus the data tasks (pure)."""
    needed = {k: v * count for k, v in bundle.items()}
    needed["CPU"] = needed.get("CPU", 0.0) + data_cpus
    return all(maximum.get(k, 0) >= v - 1e-9 for k, v in needed.items())


def check_shared_store(uri: str | None, key: str, shared: bool, shared_key: str) -> None:
    """Refuse a local store for work spread over several nodes: each would write to its own disk,
    and what one node wrote the driver or the next attempt would not find. ``shared`` says the
    path is on a disk every node mounts."""
    if not uri or shared or not storage.resolve(uri).is_local:
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        raise ConfigError(
            f"{key}={uri} is a local path, and this Ray cluster has {nodes} nodes that do not share a "
            f"disk: set {key} to s3://... (or a path every node mounts and {shared_key}=true)"
        )
