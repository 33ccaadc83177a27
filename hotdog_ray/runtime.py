"""Starting or joining Ray, the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local one.

    Idempotent: a second call, or a call inside a Ray job, reuses the running instance.
    """
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    try:
        # Ray Data's per-operator progress bars swamp a terminal on small jobs.
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False  # two lines per dataset per epoch; our epoch line is the progress
    except Exception:  # pragma: no cover - older Ray
        pass
    log.info("Ray resources: %s", ray.cluster_resources())
