"""The process's life, without Ray: SIGTERM as Ctrl-C, progress lines on long work, and what a job
started from Ray's copy of its working directory would lose."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from hotdog_ray.config import DEFAULT_TRACKING_URI

log = logging.getLogger(__name__)


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


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive within the block take effect when it ends, not inside it.

    For writes that must not be cut in half: a KeyboardInterrupt inside a SQLite write leaves the
    process holding the database lock, so the run's own ``KILLED`` update then waits out the busy
    timeout and fails. Only in the main thread, where handlers live (elsewhere signals never land).
    Nested blocks defer to the outermost.
    """
    handlers = [signal.getsignal(sig) for sig in _DEFERRED]
    # None: a handler set outside Python, which could not be put back
    if threading.current_thread() is not threading.main_thread() or _defer in handlers or None in handlers:
        yield
        return
    before = {sig: signal.signal(sig, _defer) for sig in _DEFERRED}
    _pending.clear()
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(_pending):
            signal.raise_signal(sig)  # now delivered to the handler the block replaced


_pending: list[int] = []


def _defer(signum: int, _frame: Any) -> None:
    _pending.append(signum)


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


# Where `ray job submit --working-dir` unpacks the job's files on the node: a copy that Ray deletes
# with the session, and that lacks every .gitignored folder (data/, mlflow.db, ray_results/).
RAY_WORKING_DIR_COPY = "runtime_resources/working_dir_files"


def in_ray_working_dir_copy(cwd: str | None = None) -> bool:
    return RAY_WORKING_DIR_COPY in (cwd or os.getcwd()).replace(os.sep, "/")


def _relative_local(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") and not os.path.isabs(uri.removeprefix("file://"))


def lost_results(cfg: Any, command: str, cwd: str | None = None) -> list[str]:
    """What a job run from Ray's copy of its working directory would lose or not find: relative
    local stores (written into the copy Ray deletes) and a relative ``data.root`` Ray did not
    upload. Empty elsewhere, or when every store is absolute or remote."""
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
