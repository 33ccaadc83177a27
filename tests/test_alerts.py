"""The alert rules of k8s/monitoring.yaml against promtool: the manifest's own rules, checked and
unit-tested over synthetic series (tests/alerts/rules_test.yaml). Prometheus' promtool comes with
Debian's ``prometheus`` package, which CI installs; elsewhere the tests skip, saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import requests
import yaml

from tests.helpers import (
    GaugesSetOnce,
    free_port,
    mlflow_store,
    png,
    register_model,
    scrape,
    tiny_model,
    tiny_model_config,
    total,
    wait_until,
)
from tests.imagegen import CLASSES

HERE = Path(__file__).parent
MANIFEST = HERE.parent / "k8s" / "monitoring.yaml"


def installed(program: str) -> str:
    """The path of Debian's ``prometheus`` package's ``program``: required where CI says so
    (HOTDOG_REQUIRE_PROMETHEUS), else a skip that says why."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("HOTDOG_REQUIRE_PROMETHEUS"):
            pytest.fail(f"HOTDOG_REQUIRE_PROMETHEUS is set but {program} is not installed")
        pytest.skip(f"no {program} on this machine (apt-get install prometheus; CI does)")
    return path


def promtool() -> str:
    return installed("promtool")


def rule_groups() -> dict:
    """The PrometheusRule's groups, as a Prometheus rule file."""
    (rule,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


def test_the_manifests_rules_pass_promtools_checks(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    done = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups()['groups'])} rules found" in done.stdout


def test_every_rule_fires_when_it_should_and_not_before(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    shutil.copy(HERE / "alerts" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    done = subprocess.run(
        [promtool(), "test", "rules", str(tmp_path / "rules_test.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = yaml.safe_load((HERE / "alerts" / "rules_test.yaml").read_text())
    firing = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    every = {r["alert"] for g in rule_groups()["groups"] for r in g["rules"]}
    assert firing == every  # each rule has a case where it fires


# --- a real Prometheus scraping a live service --------------------------------------------------


def prometheus_binary() -> str:
    return installed("prometheus")


class LivePrometheus:
    """Prometheus on loopback: the manifest's rules, every second, over the Ray node's metrics of one
    Serve application (other tests' job gauges in this Ray session are dropped at scrape)."""

    def __init__(self, folder: Path, target: str, application: str) -> None:
        self.port = free_port()
        (folder / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(folder / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "ray",
                    "static_configs": [{"targets": [target]}],
                    "metric_relabel_configs": [
                        {"source_labels": ["application"], "regex": application, "action": "keep"}
                    ],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(folder / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            try:
                return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=timeout, interval=0.5, message="prometheus did not become ready")

    def alerts(self) -> dict[str, str]:
        """alertname -> state (pending or firing) of every active alert."""
        data = requests.get(self.url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return {a["labels"]["alertname"]: a["state"] for a in data}

    def value(self, expr: str) -> float | None:
        result = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5).json()
        rows = result["data"]["result"]
        return float(rows[0]["value"][1]) if rows else None

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: Prometheus shuts down cleanly
        self.proc.wait(timeout=30)
        self.log.close()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel, PromQL) of every query of the Grafana dashboard, its variables filled in as Grafana
    would for "All" clusters over the last minutes."""
    dashboard = json.loads((HERE.parent / "k8s" / "grafana-dashboard.json").read_text())
    fill = {"$cluster": ".*", "$__rate_interval": "1m", "$__range": "10m"}
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in fill.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"panel {panel['title']!r}: a variable the test does not fill: {expr}"
            out.append((panel["title"], expr))
    return out


@dataclass(kw_only=True)
class LiveService:
    """A served model under steady traffic, with three Prometheus servers loaded with our rules:
    one watching it (``prom``), one a deployment whose registry has no model (``prom_empty``), one
    every application, for the dashboard (``prom_all``). Each sees only its own applications
    (other tests' job gauges in this Ray are dropped)."""

    cfg: Any
    models: list[str]
    prom: LivePrometheus
    prom_empty: LivePrometheus
    prom_all: LivePrometheus
    loaded_at: float
    good_traffic: threading.Event  # cleared: the client sends what is not an image
    gauges_run: str  # the label of the gauges GaugesSetOnce set once, at the service's start
    gauges_set_at: float


@pytest.fixture(scope="module")
def live(shared_serve, tmp_path_factory):
    from ray import serve

    from hotdog_ray.registry import set_alias
    from hotdog_ray.server.launch import deployment

    prometheus_binary()
    tmp = tmp_path_factory.mktemp("alerts")
    cfg = tiny_model_config(
        tmp / "store",
        "serve.cpus_per_replica=0.25",
        "serve.reload_interval_s=2",
        "rollout.mode=shadow",
        f"prediction_log.location={tmp / 'predictions'}",
        "prediction_log.flush_interval_s=0.5",
    )
    # The champion flags every answer out of distribution (a threshold below any score): the
    # dashboard's OOD panel has data, and no alert may fire for it.
    models = [
        register_model(
            cfg, tiny_model(CLASSES, seed=i), CLASSES, name="alerting", ood_threshold=-1.0 if i == 0 else None
        )[1]
        for i in range(3)
    ]
    set_alias(cfg.tracking, models[0])
    set_alias(cfg.tracking, models[1], alias=cfg.tracking.challenger_alias)
    # A registry with no model in it.
    empty = tiny_model_config(tmp / "empty", "serve.cpus_per_replica=0.25", "serve.reload_interval_s=0")
    target = f"127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}"
    proms = []
    for name, apps in (("healthy", "alerting"), ("no-model", "no-model"), ("dashboard", ".*")):
        (tmp / name).mkdir()
        proms.append(LivePrometheus(tmp / name, target, apps))
    stop, good = threading.Event(), threading.Event()
    good.set()
    sender = threading.Thread(target=steady_traffic, args=(shared_serve.url, stop, good), daemon=True)
    # Every gauge we export, set once in a process that lives on, beside a plain Ray gauge: checked
    # once the healthy watch is over, long past Ray's eviction of unrefreshed gauges.
    gauges_run = f"keeper-{uuid.uuid4().hex[:8]}"
    keeper = ray.remote(num_cpus=0)(GaugesSetOnce).remote()
    ray.get(keeper.set_once.remote(gauges_run, exported_gauges()))
    gauges_set_at = time.monotonic()
    try:
        for p in proms:
            p.wait_ready()
        serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name="alerting", route_prefix="/")
        serve.run(
            deployment(empty).bind(empty.model_dump(mode="json")), name="no-model", route_prefix="/no-model"
        )
        loaded_at = time.monotonic()
        sender.start()
        yield LiveService(
            cfg=cfg,
            models=models,
            prom=proms[0],
            prom_empty=proms[1],
            prom_all=proms[2],
            loaded_at=loaded_at,
            good_traffic=good,
            gauges_run=gauges_run,
            gauges_set_at=gauges_set_at,
        )
    finally:
        ray.kill(keeper)
        stop.set()
        for app in ("alerting", "no-model"):
            serve.delete(app)
        for p in proms:
            p.stop()


def steady_traffic(url: str, stop: threading.Event, good: threading.Event) -> None:
    """About 20 requests a second to each app until ``stop``: photos while ``good`` is set, else
    bytes that are not an image; the empty app's answers are its 503s."""
    images = [png(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)) for i in range(8)]
    i = 0
    while not stop.is_set():
        data = images[i % len(images)] if good.is_set() else b"not an image"
        try:
            requests.post(url + "/predict", data=data, headers={"content-type": "image/png"}, timeout=10)
            requests.get(url + "/no-model/model", timeout=10)
        except requests.RequestException:
            pass
        i += 1
        time.sleep(0.05)  # the pace of the traffic, not a wait for a condition


# The tests below run in this order on one live service.


@pytest.mark.e2e
def test_a_healthy_service_raises_no_alert_through_a_reload_and_past_gauge_eviction(live):
    """Scraped every second for over three gauge lifetimes past its model load (65 s at Ray's default
    report interval; with prediction log, shadow rollout and a hot reload on): no alert pending or
    firing, the loaded-model gauge still there."""
    from hotdog_ray.registry import set_alias

    # Until the replica's first metrics report the model is absent from the endpoint and the
    # no-model alert is rightly pending: watch from the first report.
    champion_loaded = 'sum(ray_hotdog_model_info{role="champion"})'
    wait_until(lambda: live.prom.value(champion_loaded) == 1, timeout=60, interval=1, message=champion_loaded)
    time.sleep(3)  # a few rule evaluations on the new data
    seen: dict[str, str] = {}
    moved = False
    # Past Ray's dropping of unrefreshed gauges, a reload, then twice past it again.
    reload_at, watch = 1.25 * gauge_ttl_s(), 3.25 * gauge_ttl_s()
    while time.monotonic() - live.loaded_at < watch:
        seen |= live.prom.alerts()
        if not moved and time.monotonic() - live.loaded_at > reload_at:
            set_alias(live.cfg.tracking, live.models[2])  # a new champion: the replica reloads in place
            moved = True
        time.sleep(2)  # one look per two scrapes, for the whole watch
    assert seen == {}, seen  # healthy: nothing pending, nothing firing
    assert live.prom.value(champion_loaded) == 1.0
    assert live.prom.value("sum(rate(ray_hotdog_requests_total[30s]))") > 1


def gauge_ttl_s() -> float:
    """How long Ray's agent keeps a gauge not set again: two report intervals."""
    from hotdog_ray.compat import metrics_report_interval_s

    return 2 * metrics_report_interval_s()


def exported_gauges() -> dict[str, tuple[str, ...]]:
    """Our gauges, with their labels."""
    from hotdog_ray.telemetry import SERIES

    return {n: labels for n, (kind, labels, _) in SERIES.items() if kind == "gauge"}


@pytest.mark.e2e
def test_every_gauge_set_once_is_still_exported_long_after_ray_drops_unrefreshed_ones(live):
    """Ray's agent drops the plain gauge after two report intervals, so the test can tell; every
    one of ours, set once at the same time, stays."""
    gauges, run = exported_gauges(), live.gauges_run

    def seen() -> tuple[float, set[str]]:
        # Gauges without labels cannot carry the run: present at all is what they can show.
        ours = {n for n, labels in gauges.items() if scrape(rf"ray_{n}\{{.*{run if labels else ''}")}
        return total(r"ray_hotdog_test_plain_gauge\{", run=run), ours

    wait_until(
        lambda: seen() == (0.0, set(gauges)) and time.monotonic() - live.gauges_set_at > 1.25 * gauge_ttl_s(),
        timeout=60,
        interval=2,
        message=seen,
    )


@pytest.mark.e2e
def test_a_deployment_without_a_model_raises_the_no_model_alert(live):
    """Its own alert, and its 503s count as failed requests (both pending, then paging)."""
    expected = {"HotdogNoModelLoaded": "pending", "HotdogHighErrorRate": "pending"}
    wait_until(
        lambda: live.prom_empty.alerts() == expected, timeout=60, interval=2, message=live.prom_empty.alerts
    )


@pytest.mark.e2e
def test_refused_images_raise_the_refusal_alert_not_the_error_rate(live):
    live.good_traffic.clear()  # a client that sends what is not an image, 20 times a second
    wait_until(lambda: live.prom.alerts().get("HotdogHighRefusalRate") == "pending", timeout=60, interval=2)
    assert live.prom.alerts() == {"HotdogHighRefusalRate": "pending"}  # refused, not failed


@pytest.mark.e2e
def test_every_dashboard_panel_has_data_when_its_feature_runs(live, image_tree, tmp_path):
    """The jobs the dashboard shows, in this process: a training run, then a nightly scoring run of
    its model, whose drift check compares the night with the model's reference."""
    from hotdog_ray.config import load_config
    from hotdog_ray.score import score
    from hotdog_ray.train import run_training

    jobs = load_config(
        None,
        [
            f"data.root={image_tree.root}",
            "data.image_size=16",
            "model.name=first_cnn",
            "model.filters=4",
            "train.num_workers=0",
            "train.epochs=2",
            "train.batch_size=8",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.uri={mlflow_store(tmp_path / 'jobs')}",
        ],
    )
    trained = run_training(jobs, run_name="dashboard", evaluate_test=False)
    score(
        jobs,
        input=str(image_tree.root / "test"),
        output=str(tmp_path / "scores"),
        date="2026-12-06",
        model=f"models:/{jobs.tracking.registered_model}/{trained.model_version}",
    )
    queries = dashboard_queries()

    def missing() -> list[tuple[str, str]]:
        return [(panel, q) for panel, q in queries if live.prom_all.value(q) is None]

    # The jobs' last values reach the endpoint within a report.
    wait_until(lambda: not missing(), timeout=60, interval=2, message=missing)
