"""Ray internals we use where Ray has no public API for the job: one function per use, each checked
against the Ray version in :data:`CHECKED_WITH` and pinned by ``tests/test_compat.py``, which fails
loudly (naming the function) when a Ray upgrade moves what it reaches for."""

from __future__ import annotations

import logging

import pyarrow.fs as pafs
import ray
import ray._private.state as ray_state
import ray.train._internal.session as train_session
import ray.train.v2._internal.execution.context as train_v2_context

log = logging.getLogger(__name__)

CHECKED_WITH = "2.60.0"


def train_v2_report_logger() -> str:
    """The name of the logger Train V2 writes two lines per report and checkpoint with: it is named
    by its file's path, outside ``ray.train``, so quieting ``ray.train`` misses it."""
    return train_v2_context.__file__


def trial_storage() -> tuple[pafs.FileSystem, str]:
    """This Tune trial's storage folder: its filesystem and path (local or object storage). Tune's
    public ``get_context().get_trial_dir()`` names the node's local copy, not the storage folder
    where every checkpoint of the trial lies. Raises outside a trial."""
    where = train_session.get_storage()
    return where.storage_filesystem, where.trial_fs_path


def autoscaling_max_resources() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may start (None on a fixed cluster): Ray
    exposes only the resources of the nodes running now."""
    return ray_state.state.get_max_resources_from_cluster_config()


def metrics_report_interval_s() -> float:
    """How often this process's metrics reach the node's agent (Ray's ``metrics_report_interval_ms``,
    10 s by default, floored at 1 s as Ray floors it); the agent drops a gauge not set again within
    two of them. Ray exposes the system config only as ``ray._config``."""
    return max(ray._config.metrics_report_interval_ms(), 1000) / 1000
