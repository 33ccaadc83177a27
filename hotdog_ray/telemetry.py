"""Telemetry: Prometheus series through Ray's metrics API; every node serves them beside Ray's own.

Ray exports what ``ray.util.metrics`` records at ``http://<node>:<MetricsExportPort>/metrics``
(``ray.nodes()[i]["MetricsExportPort"]``), prefixed ``ray_``: ``hotdog_requests`` is scraped as
``ray_hotdog_requests_total``. Labels are bounded (endpoint, status, class, reason, model version,
run name): never a request id or a file name. Outside Ray (the plain uvicorn baseline, unit tests)
:func:`serving_telemetry` returns :class:`Telemetry`, which records nothing.

Ray exports a histogram's ``_sum`` from its bucket midpoints, so averages are approximate; the
buckets and ``_count`` are exact. The names, with their labels, are in :data:`SERIES`; the Grafana
dashboard and the alert rules in
``k8s/`` query only these (a test checks).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray import serve
from ray.serve import metrics as serve_series
from ray.util import metrics as ray_metrics

from hotdog_ray import compat

log = logging.getLogger(__name__)

LATENCY_S = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# name -> (kind, labels, help). Ray adds its own labels (node, session, worker) and, for
# ray.serve.metrics, the deployment, replica and application.
SERIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "hotdog_requests": ("counter", ("endpoint", "status"), "HTTP requests by endpoint and status"),
    "hotdog_request_latency_seconds": ("histogram", ("endpoint",), "request latency, seconds"),
    "hotdog_batch_size": ("histogram", (), "images per forward pass in a Serve replica"),
    "hotdog_predictions": ("counter", ("label", "served_by"), "answers by predicted class"),
    "hotdog_out_of_distribution": (
        "counter",
        ("version", "served_by"),
        "answers whose image looks like nothing the model was trained on, by model version",
    ),
    "hotdog_errors": ("counter", ("reason",), "refused requests and images by reason"),
    "hotdog_model_reloads": ("counter", ("role",), "models loaded by hot reload"),
    "hotdog_model_info": ("gauge", ("model", "version", "role"), "1 for each loaded model version"),
    "hotdog_prediction_log_rows": ("counter", ("outcome",), "prediction log rows written or dropped"),
    "hotdog_shadow_answers": (
        "counter",
        ("agreed",),
        "shadow rollout: challenger answers, same label or not",
    ),
    "hotdog_score_images": ("counter", ("outcome",), "batch scoring: images scored or failed"),
    "hotdog_score_images_per_second": ("gauge", (), "batch scoring: rate of the last run"),
    "hotdog_score_last_success_timestamp_seconds": ("gauge", (), "batch scoring: end of the last run"),
    "hotdog_drift_psi": ("gauge", ("measure",), "population stability index of the last drift check"),
    "hotdog_drift_flagged": ("gauge", (), "1 when the last drift check went over monitor.psi_threshold"),
    "hotdog_train_epoch": ("gauge", ("run",), "training: epochs finished"),
    "hotdog_train_loss": ("gauge", ("run",), "training: last epoch's loss"),
    "hotdog_train_images_per_second": ("gauge", ("run",), "training: last epoch's rate"),
}

# HTTP statuses our handlers refuse with, as bounded reasons.
REASONS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    413: "too_large",
    415: "unsupported_type",
    422: "bad_image",
    503: "no_model",
}


def reason_of(status: int) -> str:
    return REASONS.get(status, "server_error" if status >= 500 else "client_error")


class GaugeKeeper:
    """Records the last value of every gauge this process set again on a timer, so that Ray keeps
    exporting it for as long as the process lives.

    Why: Ray 2.60's metrics agent drops a gauge observation that was not refreshed within two
    report intervals (``OpenTelemetryMetricRecorder._gauge_metric_ttl_s`` in
    ``ray/_private/telemetry/open_telemetry_metric_recorder.py``: 2 x ``metrics_report_interval_ms``,
    20 s by default), and a worker exports a gauge only in an interval in which it was set. A gauge
    set once (the loaded model's ``hotdog_model_info``) vanished from the node's endpoint about
    16 s later while its replica went on serving, and the no-model alert fired on a healthy service.
    """

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._values: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, float, dict | None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def keep(self, gauge: Any, value: float, tags: dict[str, str] | None) -> None:
        """Remember ``gauge``'s value for ``tags`` (its last one wins) and start the timer once."""
        key = (id(gauge), tuple(sorted((tags or {}).items())))
        with self._lock:
            self._values[key] = (gauge, value, tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hotdog-gauges", daemon=True)
                self._thread.start()

    def refresh(self) -> None:
        """Record every kept value once more."""
        with self._lock:
            values = list(self._values.values())
        for gauge, value, tags in values:
            try:
                gauge.set(value, tags=tags)
            except Exception as exc:  # noqa: BLE001 - one bad series must not stop the others
                log.debug("gauge refresh failed: %s", exc)

    def _run(self) -> None:
        while True:
            time.sleep(self.period_s)
            self.refresh()


class KeptGauge:
    """A Ray gauge whose values :class:`GaugeKeeper` records again until the process ends."""

    def __init__(self, gauge: Any, keeper: GaugeKeeper) -> None:
        self._gauge, self._keeper = gauge, keeper

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._gauge.set(value, tags=tags)
        self._keeper.keep(self._gauge, value, tags)


_KEEPER: list[GaugeKeeper] = []  # one per process, made by the first gauge


def gauge_keeper() -> GaugeKeeper:
    """This process's keeper, refreshing at half of Ray's metrics report interval: every report
    carries a fresh point, whatever interval the cluster runs with."""
    if not _KEEPER:
        _KEEPER.append(GaugeKeeper(compat.metrics_report_interval_s() / 2))
    return _KEEPER[0]


def _make(name: str, module: Any) -> Any:
    kind, labels, help_text = SERIES[name]
    if kind == "counter":
        return module.Counter(name, description=help_text, tag_keys=labels)
    if kind == "gauge":
        return KeptGauge(module.Gauge(name, description=help_text, tag_keys=labels), gauge_keeper())
    bounds = BATCH_SIZES if name == "hotdog_batch_size" else LATENCY_S
    return module.Histogram(name, description=help_text, boundaries=bounds, tag_keys=labels)


class Telemetry:
    """What a server records about its work; this base records nothing (outside a Serve replica, no
    node would export it), :class:`ReplicaTelemetry` records it as Prometheus series."""

    def request(self, endpoint: str, status: int, seconds: float) -> None: ...

    def batch(self, size: int) -> None: ...

    def prediction(self, label: str, served_by: str, n: int = 1) -> None: ...

    def out_of_distribution(self, version: str | None, served_by: str, n: int = 1) -> None: ...

    def error(self, reason: str, n: int = 1) -> None: ...

    def reload(self, role: str) -> None: ...

    def model(self, model: str, version: str | None, role: str, loaded: bool) -> None: ...

    def log_rows(self, outcome: str, n: int) -> None: ...

    def shadow(self, agreed: bool, n: int = 1) -> None: ...


class ReplicaTelemetry(Telemetry):
    """The serving series (``ray.serve.metrics``, which adds the deployment and replica labels)."""

    def __init__(self) -> None:
        names = [n for n in SERIES if not n.startswith(("hotdog_score", "hotdog_train", "hotdog_drift"))]
        self._m = {n: _make(n, serve_series) for n in names}

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self._m["hotdog_requests"].inc(1, tags={"endpoint": endpoint, "status": str(status)})
        self._m["hotdog_request_latency_seconds"].observe(seconds, tags={"endpoint": endpoint})

    def batch(self, size: int) -> None:
        self._m["hotdog_batch_size"].observe(size)

    def prediction(self, label: str, served_by: str, n: int = 1) -> None:
        self._m["hotdog_predictions"].inc(n, tags={"label": label, "served_by": served_by})

    def out_of_distribution(self, version: str | None, served_by: str, n: int = 1) -> None:
        self._m["hotdog_out_of_distribution"].inc(n, tags={"version": str(version), "served_by": served_by})

    def error(self, reason: str, n: int = 1) -> None:
        self._m["hotdog_errors"].inc(n, tags={"reason": reason})

    def reload(self, role: str) -> None:
        self._m["hotdog_model_reloads"].inc(1, tags={"role": role})

    def model(self, model: str, version: str | None, role: str, loaded: bool) -> None:
        tags = {"model": model, "version": str(version), "role": role}
        self._m["hotdog_model_info"].set(1 if loaded else 0, tags=tags)

    def log_rows(self, outcome: str, n: int) -> None:
        if n:
            self._m["hotdog_prediction_log_rows"].inc(n, tags={"outcome": outcome})

    def shadow(self, agreed: bool, n: int = 1) -> None:
        self._m["hotdog_shadow_answers"].inc(n, tags={"agreed": str(agreed).lower()})


def serving_telemetry() -> Telemetry:
    """:class:`ReplicaTelemetry` inside a Serve replica, else :class:`Telemetry`."""
    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - not in a replica (RayServeException), or Ray absent
        return Telemetry()
    return ReplicaTelemetry()


_JOB_SERIES: dict[str, Any] = {}  # one object per name and process: Ray registers each once


def job_gauges(*names: str) -> dict[str, Any]:
    """``ray.util.metrics`` series for a job (scoring, training, drift); empty outside Ray."""

    if not ray.is_initialized():
        return {}

    for n in names:
        if n not in _JOB_SERIES:
            _JOB_SERIES[n] = _make(n, ray_metrics)
    return {n: _JOB_SERIES[n] for n in names}
