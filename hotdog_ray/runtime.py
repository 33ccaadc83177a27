"""Starting or joining Ray, the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import logging
import os

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


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-execution banners swamp a terminal on small jobs; our
    per-epoch line is the progress. Applies to this process (the driver, or a Tune trial)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
