"""The alert rules of k8s/monitoring.yaml against promtool: the manifest's own rules, checked and
unit-tested over synthetic series (tests/alerts/rules_test.yaml). Prometheus' promtool comes with
Debian's ``prometheus`` package, which CI installs; elsewhere the tests skip, saying why."""

from __future__ import annotations

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


def test_a_healthy_service_raises_no_alert_and_faults_raise_theirs(ray_session, tmp_path):
    """A live service scraped every second for over a minute past its model load: no alert pending
    or firing, the loaded-model gauge still there; then refused images at a high rate make the
    refusal alert pending. Beside it, a deployment whose registry has no model: the no-model alert
    is pending there (each application seen by its own Prometheus)."""
    import threading
    import time

    import numpy as np
    import ray
    import requests
    from ray import serve

    from hotdog_ray.registry import set_alias
    from hotdog_ray.serve import deployment
    from tests.helpers import free_port, png, register_model, tiny_model, tiny_model_config
    from tests.imagegen import CLASSES

    prometheus_binary()
    settings = ("serve.reload_interval_s=0", "serve.cpus_per_replica=0.25")
    cfg = tiny_model_config(tmp_path / "store", *settings)
    _, version = register_model(cfg, tiny_model(CLASSES), CLASSES, name="alerting")
    set_alias(cfg.tracking, version)
    empty = tiny_model_config(tmp_path / "empty", *settings)  # a registry with no model in it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    target = f"127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}"
    (tmp_path / "healthy").mkdir()
    (tmp_path / "no-model").mkdir()
    prom = LivePrometheus(tmp_path / "healthy", target, "alerting")
    prom_empty = LivePrometheus(tmp_path / "no-model", target, "no-model")
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
        prom.wait_ready()
        prom_empty.wait_ready()
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
        while time.monotonic() - loaded_at < 65:  # past the 20 s after which Ray drops stale gauges
            seen |= prom.alerts()
            time.sleep(2)
        assert seen == {}, seen  # healthy: nothing pending, nothing firing
        assert prom.value('sum(ray_hotdog_model_info{role="champion"})') == 1.0
        assert prom.value("sum(rate(ray_hotdog_requests_total[30s]))") > 1
        # No model: its own alert, and its 503s count as failed requests (both pending, then paging).
        assert prom_empty.alerts() == {"HotdogNoModelLoaded": "pending", "HotdogHighErrorRate": "pending"}

        body["good"] = False  # a client that sends what is not an image, 20 times a second
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prom.alerts().get("HotdogHighRefusalRate") != "pending":
            time.sleep(2)
        assert prom.alerts() == {"HotdogHighRefusalRate": "pending"}  # refused, not failed
    finally:
        stop.set()
        for app in ("alerting", "no-model"):
            serve.delete(app)
        serve.shutdown()
        prom.stop()
        prom_empty.stop()
