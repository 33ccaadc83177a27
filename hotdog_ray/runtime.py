"""Starting or joining Ray, the same way from the CLI, the jobs and the tests."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator

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
