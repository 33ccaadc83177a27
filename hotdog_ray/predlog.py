"""The prediction log: a sample of what the service answered, as Parquet partitioned by date.

A Serve replica (or the plain uvicorn app) hands each answered image to :class:`PredictionLog`,
which only appends a row to a bounded in-memory queue: the request never waits on storage. A
background thread writes the queue every ``prediction_log.flush_interval_s`` to
``<prediction_log.location>/date=YYYY-MM-DD/<host>-<pid>-<n>.parquet`` (a folder or ``s3://``), and
once more when the app stops. When the queue is full (storage slower than traffic) new rows are
dropped and counted, so memory stays bounded. With ``prediction_log.images`` the image itself goes to
``<location>/images/<sha256>`` beside its row.

:func:`read` loads the rows of one day (``hotdog drift``, ``hotdog rollout report``, tests).
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from hotdog_ray import storage

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("endpoint", pa.string()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("served_by", pa.string()),  # champion, or challenger in a canary rollout
        ("label", pa.string()),
        ("probability", pa.float64()),
        ("probabilities", pa.map_(pa.string(), pa.float64())),
        ("ood_score", pa.float64()),  # null: a model without the score (and rows logged before it)
        ("in_distribution", pa.bool_()),
        ("latency_ms", pa.float64()),
        ("image_bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)


FEEDBACK_SCHEMA = pa.schema(
    [("request_id", pa.string()), ("time", pa.timestamp("ms", tz="UTC")), ("label", pa.string())]
)
FEEDBACK = "feedback"  # <prediction_log>/feedback/date=YYYY-MM-DD/: true labels sent to POST /feedback


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(kw_only=True)
class Entry:
    """One answered image, as the request path hands it over (cheap to build: no I/O, no hashing
    of large data beyond the image's SHA-256)."""

    request_id: str
    endpoint: str
    model: str
    version: str | None
    served_by: str
    label: str
    probabilities: dict[str, float]
    latency_ms: float
    image: bytes
    ood_score: float | None = None
    in_distribution: bool | None = None  # None: not known (a shadow's answer, a model without the score)
    time: float = 0.0


@dataclass(kw_only=True)
class Feedback:
    """The true label of an answered request (``POST /feedback``)."""

    request_id: str
    label: str
    time: float = 0.0


class RowLog:
    """A bounded queue of rows and the thread that writes it to Parquet by date; subclasses say
    what a row is (:attr:`schema`, :meth:`rows`).

    ``on_drop(n)`` and ``on_write(n)`` let the caller count dropped and written rows in its metrics.
    """

    schema: pa.Schema

    def __init__(
        self,
        location: str,
        *,
        sample_rate: float = 1.0,
        flush_interval_s: float = 5.0,
        max_rows: int = 10_000,
        log_images: bool = False,
        on_drop: Callable[[int], None] = lambda n: None,
        on_write: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.location = storage.resolve(location)
        self.sample_rate, self.flush_interval_s = sample_rate, flush_interval_s
        self.max_rows, self.log_images = max_rows, log_images
        self.on_drop, self.on_write = on_drop, on_write
        self.dropped = self.written = 0
        self._queue: collections.deque[Any] = collections.deque()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time: the thread's and close()'s
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._files = 0
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        log.info(
            "%s: %s (sample rate %g, flush every %g s)",
            type(self).__name__,
            location,
            sample_rate,
            flush_interval_s,
        )

    def offer(self, entry: Any) -> bool:
        """Queue ``entry`` (sampled at ``sample_rate``); False when it was sampled out or dropped.
        Never blocks: a full queue drops the row and counts it."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return False
        if len(self._queue) >= self.max_rows:
            self.dropped += 1
            self.on_drop(1)
            return False
        entry.time = entry.time or time.time()
        self._queue.append(entry)  # deque.append is atomic: no lock on the request path
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush()

    def flush(self) -> int:
        """Write what is queued now; the number of rows written. Storage errors are logged and the
        rows counted as dropped: the log must never take the service down."""
        with self._lock:
            entries = []
            while self._queue:
                entries.append(self._queue.popleft())
            if not entries:
                return 0
            try:
                self._write(entries)
            except Exception as exc:  # noqa: BLE001 - see docstring
                log.warning(
                    "prediction log: could not write %d rows to %s: %s", len(entries), self.location.uri, exc
                )
                self.dropped += len(entries)
                self.on_drop(len(entries))
                return 0
            self.written += len(entries)
            self.on_write(len(entries))
            return len(entries)

    def rows(self, entries: list[Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _write(self, entries: list[Any]) -> None:
        rows = self.rows(entries)
        by_day: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for row in rows:
            by_day[row["time"].strftime("%Y-%m-%d")].append(row)
        for day, day_rows in by_day.items():
            self._files += 1
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(day_rows, schema=self.schema), buf)
            name = f"{self._prefix}-{self._files:06d}.parquet"
            storage.write_bytes(
                self.location.fs, self.location.join(f"date={day}", name).path, buf.getvalue()
            )
        self.written_rows(entries, rows)

    def written_rows(self, entries: list[Any], rows: list[dict[str, Any]]) -> None:
        """Called after each write with what was written."""

    def close(self) -> None:
        """Stop the thread and write what is left (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.flush_interval_s))
        self.flush()
        log.info("%s closed: %d rows written, %d dropped", type(self).__name__, self.written, self.dropped)


class PredictionLog(RowLog):
    """The answers (:class:`Entry`), and with ``log_images`` the images, at ``<location>``."""

    schema = SCHEMA

    def rows(self, entries: list[Entry]) -> list[dict[str, Any]]:
        return [_row(e) for e in entries]

    def written_rows(self, entries: list[Entry], rows: list[dict[str, Any]]) -> None:
        if self.log_images:
            for entry, row in zip(entries, rows):
                path = self.location.join("images", row["sha256"]).path
                storage.write_bytes(self.location.fs, path, entry.image)


class FeedbackLog(RowLog):
    """True labels (:class:`Feedback`) at ``<prediction log>/feedback``."""

    schema = FEEDBACK_SCHEMA

    def rows(self, entries: list[Feedback]) -> list[dict[str, Any]]:
        return [
            {
                "request_id": e.request_id,
                "time": datetime.fromtimestamp(e.time, tz=timezone.utc),
                "label": e.label,
            }
            for e in entries
        ]


def _row(e: Entry) -> dict[str, Any]:
    return {
        "request_id": e.request_id,
        "time": datetime.fromtimestamp(e.time, tz=timezone.utc),
        "endpoint": e.endpoint,
        "model": e.model,
        "version": None if e.version is None else str(e.version),
        "served_by": e.served_by,
        "label": e.label,
        "probability": max(e.probabilities.values()),
        "probabilities": list(e.probabilities.items()),
        "ood_score": e.ood_score,
        "in_distribution": e.in_distribution,
        "latency_ms": round(e.latency_ms, 3),
        "image_bytes": len(e.image),
        # In the writer thread, not on the request path (hashlib releases the GIL on large inputs).
        "sha256": hashlib.sha256(e.image).hexdigest(),
    }


def read(
    location: str, date: str | None = None, *, since: str | None = None, schema: pa.Schema = SCHEMA
) -> pa.Table:
    """Every row of the log at ``location`` (of one ``date``, or of the days from ``since``, both
    YYYY-MM-DD); an empty table if none. ``schema``: :data:`FEEDBACK_SCHEMA` for the feedback."""
    loc = storage.resolve(location)
    days = [d.removeprefix("date=") for d in storage.list_dirs(loc) if d.startswith("date=")]
    days = [d for d in days if (date is None or d == date) and (since is None or d >= since)]
    tables = [t for day in days for t in storage.read_parquet_tables(loc.join(f"date={day}"), schema)]
    return pa.concat_tables(tables) if tables else schema.empty_table()
