"""MLflow runs as handles: ``with tracking.run(cfg.tracking, name=...) as run: run.log_metrics(...)``.

A :class:`Run` carries its store and its id and has one client, so logging never takes the
arguments in the wrong order and never touches MLflow's process-wide state. The ``run`` block
decides how the run ends: FINISHED when it is left normally, FAILED (with the reason in the
``failure_reason`` tag) when an exception leaves it, KILLED on Ctrl-C or SIGTERM. The handle
pickles to its store and id, so Ray Train callbacks and Tune trials log to the same run.
The registry lives in :mod:`hotdog_ray.registry`, models in MLflow in :mod:`hotdog_ray.model_store`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from hotdog_ray.config import TrackingSettings
from hotdog_ray.process import interrupts_deferred, sigterm_interrupts
from hotdog_ray.registry import client, tracking_uri

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own key: the UI nests child runs under it
FAILURE_TAG = "failure_reason"
DIVERGED_TAG = "diverged"

__all__ = ["Run", "run", "find_runs", "child_runs", "recent_runs", "tracking_uri", "git_commit"]


def git_commit() -> str:
    """The commit the code runs from, or ``unknown`` outside a git checkout."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


F = TypeVar("F", bound=Callable[..., Any])


def _uncut(method: F) -> F:
    """A store call that Ctrl-C or SIGTERM waits for (:func:`interrupts_deferred`), so the run's
    own ``KILLED`` update never finds the database locked by a write it cut in half."""

    @functools.wraps(method)
    def whole(*args: Any, **kwargs: Any) -> Any:
        with interrupts_deferred():
            return method(*args, **kwargs)

    return whole  # type: ignore[return-value]


class Run:
    """One MLflow run: everything a stage logs goes through here."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.id = uri, run_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "id": self.id}  # the client stays behind; the copy makes its own

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["id"])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @_uncut
    def log_params(self, params: dict[str, Any]) -> None:
        """Params in one request; MLflow caps a value at 500 characters."""
        self.client.log_batch(
            self.id, params=[Param(k, "" if v is None else str(v)[:500]) for k, v in params.items()]
        )

    @_uncut
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Finite metrics in one request (a remote server costs a round trip per call)."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.id,
            metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))],
        )

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One epoch's numeric metrics at step ``epoch``; a divergence becomes a tag (the reason survives
        Train V2, whose result keeps only checkpointed metrics)."""
        if metrics.get("diverged"):
            self.set_tags({DIVERGED_TAG: metrics["diverged"]})
        self.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"},
            step=int(metrics["epoch"]),
        )

    @_uncut
    def metric_steps(self, key: str) -> set[int]:
        """The steps at which ``key`` was logged (an epoch metric: the epochs on record)."""
        return {m.step for m in self.client.get_metric_history(self.id, key)}

    @_uncut
    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.id, data, name)

    @_uncut
    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, text, name)

    @_uncut
    def log_figure(self, figure: Any, name: str) -> None:
        self.client.log_figure(self.id, figure, name)

    @_uncut
    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_uncut
    def tag(self, key: str) -> str | None:
        """A tag of this run, or None."""
        return self.client.get_run(self.id).data.tags.get(key)

    @_uncut
    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.id, status=status)


@contextlib.contextmanager
def run(
    tracking: TrackingSettings,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    parent: str | None = None,
    resume: str | None = None,
) -> Iterator[Run]:
    """Open a run of ``tracking.experiment`` (or, with ``resume``, reopen that run) for the block.

    Args:
        tracking: the store, experiment and registry settings.
        name: the run's name (ignored with ``resume``).
        tags: tags to set; ``git_commit`` is always added to a new run.
        parent: a parent run id: the run shows nested under it (a sweep's trial).
        resume: the id of an ended run to mark running again (a resumed sweep).
    """
    uri = tracking_uri(tracking)
    handle = _reopen(uri, resume) if resume else _create(uri, tracking.experiment, name, parent)
    if tags or not resume:
        handle.set_tags({**({} if resume else {"git_commit": git_commit()}), **(tags or {})})
    with sigterm_interrupts():  # so that the run ends KILLED instead of staying RUNNING
        try:
            yield handle
        except (KeyboardInterrupt, SystemExit) as exc:
            # SystemExit too: Ray's driver turns SIGTERM into sys.exit.
            handle.end("KILLED")
            log.warning("run %s killed (%s)", handle.id, type(exc).__name__)
            raise
        except BaseException as exc:
            handle.set_tags({FAILURE_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
            handle.end("FAILED")
            raise
    handle.end("FINISHED")


def _create(uri: str, experiment: str, name: str | None, parent: str | None) -> Run:
    store = MlflowClient(uri)
    found = store.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else store.create_experiment(experiment)
    tags = {PARENT_TAG: parent} if parent else None
    return Run(uri, store.create_run(experiment_id, run_name=name, tags=tags).info.run_id)


def _reopen(uri: str, run_id: str) -> Run:
    handle = Run(uri, run_id)
    handle.client.update_run(run_id, status="RUNNING")
    return handle


def find_runs(tracking: TrackingSettings, tags: dict[str, str]) -> list:
    """Runs of ``tracking.experiment`` carrying all of ``tags``, newest first."""
    mlflow = client(tracking)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return mlflow.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"])


def child_runs(tracking: TrackingSettings, parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id`` (a sweep's trials), oldest first."""
    mlflow = client(tracking)
    parent = mlflow.get_run(parent_run_id)
    return mlflow.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )


def recent_runs(tracking: TrackingSettings, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs of ``tracking.experiment`` with their key metrics (for ``hotdog runs``)."""
    mlflow = client(tracking)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return []
    rows = []
    for found in mlflow.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit
    ):
        tags, m = found.data.tags, found.data.metrics
        rows.append(
            {
                "run_id": found.info.run_id,
                "name": found.info.run_name,
                "status": found.info.status,
                "kind": tags.get("kind") or ("trial" if PARENT_TAG in tags else "train"),
                "start": found.info.start_time,
                "model": tags.get("model", ""),
                "val_loss": m.get("best_val_loss", m.get("val_loss")),
                "val_accuracy": m.get("best_val_accuracy", m.get("val_accuracy")),
                "test_balanced_accuracy": m.get("test_balanced_accuracy"),
                "parent": tags.get(PARENT_TAG),
                "promotion": tags.get("promotion"),
            }
        )
    return rows
