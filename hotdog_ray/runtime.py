"""Starting or joining Ray, the same way from the CLI, the jobs and the tests; progress lines on long jobs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    Idempotent: a second call, or a call inside a Ray job or a Tune trial, reuses the running instance.
    """
    import ray

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
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = _PROGRESS_BARS
    ctx.print_on_execution_start = False


@contextlib.contextmanager
def sigterm_interrupts(*, replace: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM (docker stop, systemd, Kubernetes) interrupts like Ctrl-C.

    Only in the main thread (the only one that can set handlers), and only where nobody else
    handles SIGTERM unless ``replace`` (Ray's driver installs a handler of its own at ``ray.init``
    that aborts; a server that drains on Ctrl-C replaces it). A handler set inside the block stays.
    """
    if threading.current_thread() is not threading.main_thread() or (
        not replace and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt("SIGTERM")

    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is interrupt:
            signal.signal(signal.SIGTERM, before if replace else signal.SIG_DFL)


def progress_line(what: str, done: int, total: int, elapsed_s: float) -> str:
    """``scored 1200 of 5000 files (24%), 85.3 files/s, about 45 s left`` (pure)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    share = done / total if total else 1.0
    left = f"about {(total - done) / rate:.0f} s left" if rate > 0 and done < total else "done"
    return f"{what} {done} of {total} files ({share:.0%}), {rate:.1f} files/s, {left}"


class Progress:
    """Logs a :func:`progress_line` at most every ``interval_s`` as ``update`` reports work done."""

    def __init__(self, total: int, interval_s: float, what: str, clock: Callable[[], float] = time.monotonic):
        self.total, self.interval_s, self.what, self.clock = total, interval_s, what, clock
        self.start = self.last = clock()
        self.lines: list[str] = []

    def update(self, done: int, *, force: bool = False) -> None:
        now = self.clock()
        if force or now - self.last >= self.interval_s:
            self.last = now
            line = progress_line(self.what, done, self.total, now - self.start)
            self.lines.append(line)
            log.info("%s", line)


def on_this_node() -> dict[str, Any]:
    """Actor options that keep a job's helper actor (the skip log) on the driver's node: it
    lives and dies with the driver, and a worker node going away does not take it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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
    import ray

    return [
        {k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_capacity(count: int, bundle: dict[str, float], data_cpus: float, keys: str) -> None:
    """Fail in seconds, naming ``keys`` and the numbers, when the cluster's nodes cannot hold
    ``count`` workers of ``bundle`` and still run data tasks; a job would otherwise hang."""
    from hotdog_ray.errors import ConfigError

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
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it the cluster counts as fixed
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
    import ray

    from hotdog_ray import storage
    from hotdog_ray.errors import ConfigError

    if not uri or shared or not storage.resolve(uri).is_local:
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1:
        raise ConfigError(
            f"{key}={uri} is a local path, and this Ray cluster has {nodes} nodes that do not share a "
            f"disk: set {key} to s3://... (or a path every node mounts and {shared_key}=true)"
        )


# Where `ray job submit --working-dir` unpacks the job's files on the node: a copy that Ray deletes
# with the session, and that lacks every .gitignored folder (data/, mlflow.db, ray_results/).
RAY_WORKING_DIR_COPY = "runtime_resources/working_dir_files"


def in_ray_working_dir_copy(cwd: str | None = None) -> bool:
    return RAY_WORKING_DIR_COPY in (cwd or os.getcwd()).replace(os.sep, "/")


def _relative_local(uri: str) -> bool:
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return scheme in ("", "file") and not os.path.isabs(uri.removeprefix("file://"))


def lost_results(cfg: Any, command: str, cwd: str | None = None) -> list[str]:
    """What a job run from Ray's copy of its working directory would lose or not find: relative
    local stores (written into the copy Ray deletes) and a relative ``data.root`` Ray did not
    upload. Empty elsewhere, or when every store is absolute or remote."""
    from hotdog_ray.registry import DEFAULT_TRACKING_URI

    cwd = cwd or os.getcwd()
    if not in_ray_working_dir_copy(cwd):
        return []
    problems = []
    tracking = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if tracking.startswith(prefix) and not tracking.startswith(prefix + "/"):
        problems.append(
            f"the MLflow store {tracking} would be created in Ray's copy of the working directory "
            f"({cwd}), which Ray deletes with the session: set MLFLOW_TRACKING_URI (a tracking server) "
            "in the job's runtime env, or tracking.uri to an absolute path"
        )
    stores = {"train": ["train.storage_path"], "tune": ["train.storage_path"], "score": ["score.output"]}
    for key in stores.get(command, []):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and _relative_local(value):
            problems.append(
                f"{key}={value} is a relative local path: it would end up in Ray's copy of the working "
                f"directory ({cwd}), deleted with the session; use an absolute path on shared storage or s3://"
            )
    root = cfg.data.root
    if command in ("train", "tune") and _relative_local(root) and not os.path.exists(os.path.join(cwd, root)):
        problems.append(
            f"data.root={root} is not in the job's files: Ray uploads the working directory without its "
            ".gitignored folders (data/ among them); use an absolute path the nodes share, or s3://"
        )
    return problems
