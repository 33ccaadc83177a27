"""The alert rules of k8s/monitoring.yaml against promtool: the manifest's own rules, checked and
unit-tested over synthetic series (tests/alerts/rules_test.yaml). Prometheus' promtool comes with
Debian's ``prometheus`` package, which CI installs; elsewhere the tests skip, saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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
        from tests.helpers import free_port

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
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            assert self.proc.poll() is None, Path(self.log.name).read_text()[-2000:]
            time.sleep(0.5)
        raise AssertionError("prometheus did not become ready")

    def alerts(self) -> dict[str, str]:
        """alertname -> state (pending or firing) of every active alert."""
        import requests

        data = requests.get(self.url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return {a["labels"]["alertname"]: a["state"] for a in data}

    def value(self, expr: str) -> float | None:
        import requests

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


def test_a_healthy_service_raises_no_alert_faults_raise_theirs_and_every_panel_has_data(
    ray_session, image_tree, tmp_path
):
    """A live service (prediction log, shadow rollout, hot reload on) scraped every second for over a
    minute past its model load: no alert pending or firing, the loaded-model gauge still there. Then
    a training run and a scoring run (with its drift check) in this process, refused images at a
    high rate (the refusal alert pending, not the error rate), and every dashboard query has data.
    Beside it, a deployment whose registry has no model: the no-model alert is pending there. Each
    Prometheus sees its own applications (other tests' job gauges in this Ray are dropped)."""
    import threading
    import time

    import numpy as np
    import ray
    import requests
    from ray import serve

    from hotdog_ray.config import load_config
    from hotdog_ray.registry import set_alias
    from hotdog_ray.score import score
    from hotdog_ray.server.launch import deployment
    from hotdog_ray.train import run_training
    from tests.helpers import free_port, mlflow_store, png, register_model, tiny_model, tiny_model_config
    from tests.imagegen import CLASSES

    prometheus_binary()
    settings = ("serve.cpus_per_replica=0.25", "serve.reload_interval_s=0")
    cfg = tiny_model_config(
        tmp_path / "store",
        "serve.cpus_per_replica=0.25",
        "serve.reload_interval_s=2",
        "rollout.mode=shadow",
        f"prediction_log.location={tmp_path / 'predictions'}",
        "prediction_log.flush_interval_s=0.5",
    )
    models = [register_model(cfg, tiny_model(CLASSES, seed=i), CLASSES, name="alerting")[1] for i in range(3)]
    set_alias(cfg.tracking, models[0])
    set_alias(cfg.tracking, models[1], alias=cfg.tracking.challenger_alias)
    empty = tiny_model_config(tmp_path / "empty", *settings)  # a registry with no model in it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    target = f"127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}"
    for name in ("healthy", "no-model", "dashboard"):
        (tmp_path / name).mkdir()
    prom = LivePrometheus(tmp_path / "healthy", target, "alerting")
    prom_empty = LivePrometheus(tmp_path / "no-model", target, "no-model")
    prom_all = LivePrometheus(tmp_path / "dashboard", target, ".*")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    stop = threading.Event()
    images = [png(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)) for i in range(8)]
    body = {"good": True}

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            data = images[i % len(images)] if body["good"] else b"not an image"
            try:
                requests.post(url + "/predict", data=data, headers={"content-type": "image/png"}, timeout=10)
                requests.get(url + "/no-model/model", timeout=10)  # the empty app's traffic: its 503s
            except requests.RequestException:
                pass
            i += 1
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        for p in (prom, prom_empty, prom_all):
            p.wait_ready()
        serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name="alerting", route_prefix="/")
        serve.run(
            deployment(empty).bind(empty.model_dump(mode="json")), name="no-model", route_prefix="/no-model"
        )
        loaded_at = time.monotonic()
        sender.start()
        # Until the replica's first metrics report (Ray's interval is 10 s) the model is absent
        # from the endpoint and the no-model alert is rightly pending: watch from the first report.
        deadline = loaded_at + 60
        while time.monotonic() < deadline and prom.value('sum(ray_hotdog_model_info{role="champion"})') != 1:
            time.sleep(1)
        time.sleep(3)  # a few rule evaluations on the new data
        seen: dict[str, str] = {}
        moved = False
        while time.monotonic() - loaded_at < 65:  # past the 20 s after which Ray drops stale gauges
            seen |= prom.alerts()
            if not moved and time.monotonic() - loaded_at > 25:
                set_alias(cfg.tracking, models[2])  # a new champion: the replica reloads in place
                moved = True
            time.sleep(2)
        assert seen == {}, seen  # healthy: nothing pending, nothing firing
        assert prom.value('sum(ray_hotdog_model_info{role="champion"})') == 1.0
        assert prom.value("sum(rate(ray_hotdog_requests_total[30s]))") > 1
        # No model: its own alert, and its 503s count as failed requests (both pending, then paging).
        assert prom_empty.alerts() == {"HotdogNoModelLoaded": "pending", "HotdogHighErrorRate": "pending"}

        # The jobs the dashboard shows, in this process: a training run, then a nightly scoring
        # run of its model, whose drift check compares the night with the model's reference.
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

        body["good"] = False  # a client that sends what is not an image, 20 times a second
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prom.alerts().get("HotdogHighRefusalRate") != "pending":
            time.sleep(2)
        assert prom.alerts() == {"HotdogHighRefusalRate": "pending"}  # refused, not failed

        queries = dashboard_queries()
        missing = queries
        deadline = time.monotonic() + 60  # the jobs' last values reach the endpoint within a report
        while missing and time.monotonic() < deadline:
            missing = [(panel, q) for panel, q in queries if prom_all.value(q) is None]
            time.sleep(2)
        assert missing == [], missing  # every panel has data when its feature runs
    finally:
        stop.set()
        for app in ("alerting", "no-model"):
            serve.delete(app)
        serve.shutdown()
        for p in (prom, prom_empty, prom_all):
            p.stop()
