"""Starting the server: Serve's environment switches (HAProxy ingress, throughput mode), the
deployment, the application builder of ``serving/serve_config.yaml`` and ``hotdog serve``."""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import ray
from ray import serve

from hotdog_ray import registry, storage
from hotdog_ray.config import Config, ServeSettings, load_config
from hotdog_ray.process import sigterm_interrupts
from hotdog_ray.runtime import init_ray
from hotdog_ray.server.replica import HotdogReplica

log = logging.getLogger(__name__)

# Ray Serve's switch from its Python proxy to HAProxy routing straight to the replicas.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
HAPROXY_THREADS_ENV = "RAY_SERVE_HAPROXY_NBTHREAD"
HAPROXY_METRICS_ENV = "RAY_SERVE_HAPROXY_METRICS_ENABLED"


def haproxy_threads(cpus: int) -> int:
    """HAProxy's threads on a node of ``cpus`` cores: a quarter of them, 1 to 4 (pure). One thread
    forwards tens of thousands of requests a second; the cores are the replicas'."""
    return max(1, min(4, cpus // 4))


def set_serve_env(s: ServeSettings, drain_s: float) -> None:
    """Serve's switches that the processes Ray starts read from their environment, so set before Ray
    starts (a value already exported wins): the HAProxy ingress, its threads and per-request metrics,
    the throughput mode, and how long a leaving replica drains (Ray's 30 s are for outside load
    balancers; here the only one is Serve's own HAProxy, and Ctrl-C would wait them out)."""
    os.environ.setdefault(HAPROXY_ENV, "1" if s.haproxy else "0")
    os.environ.setdefault(THROUGHPUT_ENV, "1" if s.throughput_optimized else "0")
    os.environ.setdefault(DRAIN_ENV, f"{drain_s:g}")
    threads = s.haproxy_threads or haproxy_threads(os.cpu_count() or 1)
    os.environ.setdefault(HAPROXY_THREADS_ENV, str(threads))
    os.environ.setdefault(HAPROXY_METRICS_ENV, "1" if s.haproxy_request_metrics else "0")


def deployment(cfg: Config) -> "serve.Deployment":
    """The Serve deployment for ``cfg``: replicas, autoscaling, resources, reload settings."""
    s = cfg.serve
    actor = {
        "num_cpus": s.cpus_per_replica,
        **({"num_gpus": s.gpus_per_replica} if s.gpus_per_replica else {}),
    }
    return serve.deployment(
        HotdogReplica,
        name="hotdog",
        max_ongoing_requests=s.autoscaling.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": s.autoscaling.min_replicas,
            "max_replicas": s.autoscaling.max_replicas,
            "target_ongoing_requests": s.autoscaling.target_ongoing_requests,
        },
        ray_actor_options=actor,
        user_config={"reload_token": None, "model_uri": s.model_uri},
        logging_config={"enable_access_log": s.access_log},
    )


def wait_ready(url: str, timeout: float = 120, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``url``/readyz until it answers 200 (True), ``timeout`` passes or ``alive()`` turns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return True
        except (OSError, urllib.error.URLError):  # not listening yet, 503 while loading, or slow to start
            pass
        time.sleep(0.5)
    return False


def build_app(args: dict[str, Any]):
    """Serve application builder: ``{"config": "configs/x.yaml", "set": ["serve.port=8001", ...]}``.

    The import path of ``serving/serve_config.yaml`` (``serve run`` and ``serve deploy``).
    """
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args.get("config"), list(overrides))
    return deployment(cfg).bind(cfg.model_dump(mode="json"))


def run(cfg: Config, *, blocking: bool = True, name: str = "hotdog") -> None:
    """``hotdog serve``: start (or join) Ray, start Serve's HTTP ingress on ``serve.host:port`` and the app.

    Ray started here routes HTTP through HAProxy when ``serve.haproxy`` (the default): one C process
    forwards to the replicas' own HTTP servers, where Serve's Python proxy would cost an extra
    process hop and most of a core under load (bench/RESULTS.md).
    """
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        log.info(
            "joining a running Ray: its HTTP ingress is the one it was started with (RAY_SERVE_ENABLE_HA_PROXY)"
        )
    else:
        set_serve_env(cfg.serve, drain_s=5)
    cfg = as_seen_here(cfg)
    init_ray()
    # Ctrl-C or SIGTERM (docker stop, systemd, Kubernetes) at any point, even while the app is still
    # starting, stops Serve cleanly: replicas finish the requests they hold before they exit.
    with sigterm_interrupts(replace=True):
        _serve_until_interrupted(cfg, name, blocking)


def as_seen_here(cfg: Config) -> Config:
    """``cfg`` with its store and local paths as this process sees them: replicas run in other
    processes, with the working directory and environment of the Ray they run on, where
    `sqlite:///mlflow.db`, MLFLOW_TRACKING_URI or `prediction_log.location=answers` would name
    another place, or none."""
    model_uri, log_at = cfg.serve.model_uri, cfg.prediction_log.location
    return cfg.model_copy(
        update={
            "tracking": cfg.tracking.model_copy(update={"uri": registry.tracking_uri(cfg.tracking)}),
            "serve": cfg.serve.model_copy(update={"model_uri": model_uri and storage.pinned(model_uri)}),
            "prediction_log": cfg.prediction_log.model_copy(
                update={"location": log_at and storage.pinned(log_at)}
            ),
            "rollout": cfg.rollout.model_copy(update={"store": storage.pinned(cfg.rollout.store)}),
        }
    )


def _serve_until_interrupted(cfg: Config, name: str, blocking: bool) -> None:
    try:
        try:
            serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        except Exception:
            if os.environ.get(HAPROXY_ENV) == "1":
                # HAProxy also binds fixed stats and metrics ports (Ray's template) on every interface.
                log.error(
                    "HAProxy did not start; is port %d, 8404 (stats) or 9101 (metrics) taken? Move them "
                    "with RAY_SERVE_HAPROXY_STATS_PORT / RAY_SERVE_HAPROXY_METRICS_PORT, or use Serve's own "
                    "proxy with --set serve.haproxy=false",
                    cfg.serve.port,
                )
            raise
        serve.run(
            deployment(cfg).bind(cfg.model_dump(mode="json")), name=name, route_prefix="/", blocking=False
        )
        log.info("serving on http://%s:%d (docs at /docs); Ctrl-C stops", cfg.serve.host, cfg.serve.port)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: finishing the requests in flight")
        serve.shutdown()
        log.info("stopped")
