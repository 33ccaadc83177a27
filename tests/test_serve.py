"""Ray Serve for real on loopback: HTTP answers equal the offline predictor, every bad input
gets a 4xx with a reason and leaves the replica healthy, a promoted model is picked up under
load without a failed request, a load test from a second process, and the page in Chromium."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from hotdog_ray import registry
from hotdog_ray.bundle import ModelBundle, model_meta
from hotdog_ray.predict import Predictor
from hotdog_ray.registry import set_alias
from hotdog_ray.server.launch import haproxy_threads, wait_ready
from hotdog_ray.server.shadow import ShadowQueue
from tests.helpers import (
    browser_session,
    listening_process,
    png,
    png_header_claiming,
    register_model,
    set_args,
    tiny_model,
    tiny_model_config,
    wait_until,
)
from tests.imagegen import CLASSES, LEVELS, encode, truncated_jpeg

REPO = Path(__file__).resolve().parents[1]


def register(cfg, seed: int) -> tuple[str, torch.nn.Module]:
    """A first_cnn with seeded random weights, logged and registered; (version, model)."""
    model = tiny_model(CLASSES, seed)
    _, version = register_model(cfg, model, CLASSES, name=f"serve-{seed}")
    return version, model


class App:
    def __init__(self, cfg, url: str, models: dict[str, torch.nn.Module]) -> None:
        self.cfg, self.url, self.models = cfg, url, models

    def offline(self, version: str) -> Predictor:
        return Predictor(
            ModelBundle(self.models[version], model_meta(self.cfg, list(CLASSES))),
            device="cpu",
            min_side=self.cfg.data.min_image_side,
        )

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def app(shared_serve, tmp_path_factory):
    from ray import serve

    from hotdog_ray.server.launch import deployment

    tmp = tmp_path_factory.mktemp("serve")
    url = shared_serve.url
    cfg = tiny_model_config(
        tmp,
        f"serve.port={shared_serve.port}",
        "serve.reload_interval_s=0.5",
        "serve.cpus_per_replica=0.25",
        "serve.limits.max_upload_bytes=300000",
        "serve.limits.max_images_per_request=4",
    )
    version, model = register(cfg, seed=1)
    set_alias(cfg.tracking, version)
    serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name="hotdog", route_prefix="/")
    try:
        assert wait_ready(url, timeout=60)
        yield App(cfg, url, {version: model})
    finally:
        serve.delete("hotdog")


def test_health_readiness_model_and_docs(app):
    assert requests.get(app.url + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(app.url + "/readyz", timeout=10).json()
    assert ready["ready"] and ready["model"] == {"name": "hotdog-classifier", "version": "1"}
    info = requests.get(app.url + "/model", timeout=10).json()
    assert info["classes"] == list(CLASSES) and info["image_size"] == 16 and info["version"] == "1"
    assert info["runtime"] == "onnxruntime"  # the default on the CPU: the registered ONNX graph
    assert info["key"] == "models:/hotdog-classifier/1"
    spec = requests.get(app.url + "/openapi.json", timeout=10).json()
    assert {"/predict", "/predict/batch", "/explain", "/model", "/healthz", "/readyz"} <= set(spec["paths"])
    assert requests.get(app.url + "/docs", timeout=10).status_code == 200


def test_haproxy_gets_a_quarter_of_the_cores_from_one_to_four_threads():
    assert [haproxy_threads(n) for n in (1, 2, 7, 8, 12, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]


def test_http_enters_through_haproxy(app):
    """The port is HAProxy's (``serve.haproxy``), not Serve's Python proxy, and it reaches the replica;
    HAProxy runs the threads ``serve.haproxy_threads`` gives and sends no per-request metrics line."""
    proc = listening_process(int(app.url.rsplit(":", 1)[1]))
    assert proc is not None and proc.info["name"] == "haproxy"
    args = proc.cmdline()
    config = Path(args[args.index("-f") + 1]).read_text()
    assert f"nbthread {haproxy_threads(os.cpu_count())}\n" in config
    assert "format rfc5424" not in config  # serve.haproxy_request_metrics off: no log line per request
    assert requests.get(app.url + "/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "mode,fmt",
    [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB-exif", "JPEG")],
)
def test_prediction_over_http_equals_the_offline_predictor(app, mode, fmt):
    offline = app.offline("1")
    for cls in CLASSES:
        data = encode(LEVELS[cls], mode, fmt, (30, 20), seed=4)
        expected = offline.predict(data).probabilities
        multipart = app.post("/predict", files={"file": (f"{cls}.img", data, "application/octet-stream")})
        raw = app.post("/predict", data=data, headers={"Content-Type": "image/jpeg"})
        for r in (multipart, raw):
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["probabilities"] == pytest.approx(expected, abs=1e-5)
            assert out["label"] == max(expected, key=expected.get)
            assert out["model"] == {"name": "hotdog-classifier", "version": "1"}
            assert [t["label"] for t in out["top_k"]][0] == out["label"]


def test_batch_request_gives_one_result_or_error_per_image(app):
    good = encode(LEVELS["dog"], "RGB", "JPEG", (30, 30))
    files = [
        ("files", ("a.jpg", good)),
        ("files", ("b.jpg", b"")),
        ("files", ("c.png", png(np.zeros((1, 1, 3), np.uint8)))),
        ("files", ("d.jpg", good)),
    ]
    r = app.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.jpg", "b.jpg", "c.png", "d.jpg"]
    assert results[1]["error"] == "empty file" and "too small" in results[2]["error"]
    expected = app.offline("1").predict(good).probabilities
    assert results[0]["probabilities"] == pytest.approx(expected, abs=1e-5) == results[3]["probabilities"]


@pytest.mark.parametrize(
    "case,status,reason",
    [
        ("empty", 422, "empty file"),
        ("text", 422, "not a readable image"),
        ("pdf", 422, "not a readable image"),
        ("truncated", 422, "image"),
        ("1x1", 422, "too small"),
        ("bomb", 422, "too large"),
        ("oversize", 413, "over the limit"),
        ("content-type", 415, "is not an image"),
        ("too-many", 400, "too many images"),
        ("no-file", 400, "no file"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_reason_and_the_replica_stays_healthy(app, case, status, reason):
    bodies = {
        "empty": b"",
        "text": b"hello, I am text\n" * 10,
        "pdf": b"%PDF-1.4\n%%EOF\n",
        "truncated": truncated_jpeg(),
        "1x1": png(np.zeros((1, 1, 3), np.uint8)),
        "bomb": png_header_claiming(60_000, 60_000),
    }
    if case in bodies:
        r = app.post("/predict", data=bodies[case], headers={"Content-Type": "image/jpeg"})
    elif case == "oversize":
        r = app.post(
            "/predict", data=np.random.default_rng(0).bytes(400_000), headers={"Content-Type": "image/png"}
        )
    elif case == "content-type":
        r = app.post("/predict", data=b"just text", headers={"Content-Type": "text/plain"})
    elif case == "too-many":
        good = encode(LEVELS["cat"], "RGB", "JPEG", (20, 20))
        r = app.post("/predict/batch", files=[("files", (f"{i}.jpg", good)) for i in range(5)])
    else:
        r = app.post("/predict", files={"note": (None, "not a file")})
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]
    ok = app.post(
        "/predict",
        data=encode(LEVELS["cat"], "RGB", "JPEG", (20, 20)),
        headers={"Content-Type": "image/jpeg"},
    )
    assert ok.status_code == 200 and requests.get(app.url + "/healthz", timeout=10).status_code == 200


def test_explain_returns_the_prediction_and_a_heatmap_png(app):
    import base64

    data = encode(LEVELS["hotdog"], "RGB", "JPEG", (40, 30))
    r = app.post("/explain", files={"file": ("h.jpg", data)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["probabilities"] == pytest.approx(app.offline("1").predict(data).probabilities, abs=1e-5)
    prefix = "data:image/png;base64,"
    assert out["heatmap_png"].startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(out["heatmap_png"][len(prefix) :])))
    assert img.format == "PNG" and img.size == (40, 30)


def test_load_from_a_second_process_has_no_errors(app):
    """A thousand requests at concurrency 32 from another process (bench/loadgen.py)."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "loadgen.py"),
            app.url + "/predict",
            "--requests",
            "1000",
            "--concurrency",
            "32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads(out.stdout)
    assert stats["ok"] == 1000 and stats["errors"] == 0, stats
    assert 0 < stats["p50_ms"] <= stats["p99_ms"]
    print(
        f"load test: {stats['rps']:.0f} requests/s, p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms"
    )


def test_a_promoted_model_is_served_without_a_failed_request(app):
    """Move the alias to a new version while 4 clients post continuously: every request
    succeeds, answers switch from version 1 to 2 once, and v2's answers are v2's offline ones."""
    version, model = register(app.cfg, seed=2)
    app.models[version] = model
    data = encode(LEVELS["dog"], "RGB", "JPEG", (30, 30))
    seen: list[tuple[float, int, str, dict]] = []
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(
                    app.url + "/predict", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
                )
                out = r.json() if r.headers.get("content-type") == "application/json" else {}
                seen.append(
                    (
                        time.monotonic(),
                        r.status_code,
                        out.get("model", {}).get("version"),
                        out.get("probabilities"),
                    )
                )

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(seen) >= 20, timeout=30, interval=0.05)  # under load before the switch
        set_alias(app.cfg.tracking, version)
        wait_until(lambda: any(v == version for _, _, v, _ in seen[-5:]), timeout=30, interval=0.2)
        switched = len(seen)
        wait_until(lambda: len(seen) >= switched + 20, timeout=30, interval=0.05)  # and after it
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(status == 200 for _, status, _, _ in seen), [s for s in seen if s[1] != 200][:3]
    versions = [v for _, _, v, _ in sorted(seen, key=lambda s: s[0])]
    assert versions[0] == "1" and versions[-1] == version
    switch = versions.index(version)
    assert (
        set(versions[:switch]) == {"1"} and versions[switch:].count("1") <= 4
    )  # only requests already in flight
    for v in ("1", version):
        expected = app.offline(v).predict(data).probabilities
        assert all(p == pytest.approx(expected, abs=1e-5) for _, _, vv, p in seen if vv == v)
    assert requests.get(app.url + "/model", timeout=10).json()["version"] == version


def serve_deploy(tmp_path: Path, settings: Path, dashboard: str, token: int) -> None:
    """``serve deploy`` of the app ``ondemand`` through the dashboard's REST API, polling off, with
    ``reload_token`` set to ``token``: a new token is a user_config change."""
    import yaml

    application = {
        "name": "ondemand",
        "route_prefix": "/ondemand",
        "import_path": "hotdog_ray.server.launch:build_app",
        # The second runtime: these answers must equal the offline predictor too.
        "args": {"config": str(settings), "set": ["serve.reload_interval_s=0", "predict.runtime=torch"]},
        "deployments": [{"name": "hotdog", "user_config": {"reload_token": token, "model_uri": None}}],
    }
    config = tmp_path / f"serve-{token}.yaml"
    config.write_text(yaml.safe_dump({"applications": [application]}))
    # Ray 2.60 clusters use token auth; the CLI sends the token with this set.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "deploy", str(config), "-a", dashboard],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def alive_replicas(application: str) -> set[str]:
    from ray.util.state import list_actors

    return {
        a.actor_id
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        if a.class_name.startswith(f"ServeReplica:{application}:")
    }


def served_version(url: str) -> str | None:
    """The model version the app at ``url`` serves, or None while it does not answer."""
    try:
        r = requests.get(url + "/model", timeout=10)
    except requests.RequestException:  # the proxy may hold a request while the app starts
        return None
    return r.json()["version"] if r.status_code == 200 else None


def wait_for_version(url: str, want: str | None = None, timeout: float = 90) -> str:
    """The version the app serves, once it answers (and serves ``want``, when given)."""
    return wait_until(
        lambda: (v := served_version(url)) is not None and (want is None or v == want) and v,
        timeout=timeout,
        interval=0.25,
        message=lambda: served_version(url),
    )


def test_a_user_config_change_reloads_in_place(app, tmp_path):
    """With polling off, a moved alias is picked up only when the app's user_config changes, and
    then in place: after ``serve deploy`` with a new reload_token the same replica serves the new model."""
    import ray
    import yaml
    from ray import serve

    settings = tmp_path / "ondemand.yaml"
    settings.write_text(yaml.safe_dump(app.cfg.model_dump(mode="json")))
    dashboard = f"http://{ray.init(ignore_reinit_error=True).dashboard_url}"
    url = app.url + "/ondemand"
    serve_deploy(tmp_path, settings, dashboard, token=0)
    try:
        before = wait_for_version(url)
        assert requests.get(url + "/model", timeout=10).json()["runtime"] == "torch"
        running = alive_replicas("ondemand")
        version, model = register(app.cfg, seed=5)
        app.models[version] = model
        set_alias(app.cfg.tracking, version)
        time.sleep(1.5)  # a negative: time for a poll that must not happen (reload_interval_s=0)
        assert wait_for_version(url) == before  # no polling: the alias moved, the app did not notice
        serve_deploy(tmp_path, settings, dashboard, token=1)
        assert wait_for_version(url, want=version) == version
        assert running and alive_replicas("ondemand") == running, "replaced, not reconfigured in place"
        data = encode(LEVELS["cat"], "RGB", "JPEG", (20, 20))
        r = requests.post(url + "/predict", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.json()["probabilities"] == pytest.approx(
            app.offline(version).predict(data).probabilities, abs=1e-5
        )
    finally:
        serve.delete("ondemand")


def test_api_keys_close_the_prediction_endpoints_and_leave_the_probes_open(app):
    """With serve.api_keys_env set (here through the replica's runtime_env; on Kubernetes a Secret),
    every prediction endpoint answers 401 with a reason without a key or with a wrong one, and 200
    with each configured key; the probes stay open."""
    from ray import serve

    from hotdog_ray.server.launch import deployment

    keys = ["k-first-0123456789", "k-second-9876543210"]
    cfg = app.cfg.model_copy(
        update={"serve": app.cfg.serve.model_copy(update={"api_keys_env": "HOTDOG_TEST_KEYS"})}
    )
    env = {"env_vars": {"HOTDOG_TEST_KEYS": f"{keys[0]}, {keys[1]}"}}
    keyed = deployment(cfg).options(ray_actor_options={"num_cpus": 0.25, "runtime_env": env})
    serve.run(keyed.bind(cfg.model_dump(mode="json")), name="keyed", route_prefix="/keyed")
    url = app.url + "/keyed"
    try:
        assert wait_ready(url, timeout=60)
        data = encode(LEVELS["dog"], "RGB", "JPEG", (20, 20))
        for path in ("/predict", "/explain"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {keys[0]}"}):
                r = requests.post(url + path, files={"file": ("d.jpg", data)}, headers=headers, timeout=30)
                assert r.status_code == 401 and "API key" in r.json()["error"], (path, headers, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer"
            for key in keys:
                auth = {"Authorization": f"Bearer {key}"}
                r = requests.post(url + path, files={"file": ("d.jpg", data)}, headers=auth, timeout=30)
                assert r.status_code == 200, r.text
        r = requests.post(url + "/predict/batch", files=[("files", ("d.jpg", data))], timeout=30)
        assert r.status_code == 401
        r = requests.post(
            url + "/predict/batch",
            files=[("files", ("d.jpg", data))],
            headers={"Authorization": f"Bearer {keys[1]}"},
            timeout=30,
        )
        assert r.status_code == 200 and len(r.json()["results"]) == 1
        for probe in ("/healthz", "/readyz"):
            assert requests.get(url + probe, timeout=10).status_code == 200
        spec = requests.get(url + "/openapi.json", timeout=10).json()
        for path in ("/predict", "/predict/batch", "/explain"):  # /feedback is off here
            assert spec["paths"][path]["post"]["security"] == [{"HTTPBearer": []}], path
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    finally:
        serve.delete("keyed")


@dataclass(kw_only=True)
class Rollout:
    """A champion and a challenger of one registered model, served as ``/shadow`` and ``/canary``
    (canary fraction 0.2), their figures flushed to the rollout store every half second."""

    cfg: Any
    champion: str
    challenger: str


@pytest.fixture(scope="module")
def rollout_apps(app, tmp_path_factory):
    from ray import serve

    from hotdog_ray.config import apply_overrides, from_dict
    from hotdog_ray.promote import set_challenger
    from hotdog_ray.server.launch import deployment

    store = tmp_path_factory.mktemp("rollout")
    overrides = [
        "tracking.registered_model=rollout-model",
        f"rollout.store={store}",
        "rollout.flush_interval_s=0.5",
    ]
    cfg = from_dict(apply_overrides(app.cfg.model_dump(mode="json"), overrides))
    champion, _ = register(cfg, seed=7)
    challenger, _ = register(cfg, seed=8)
    set_alias(cfg.tracking, champion)
    set_challenger(cfg, challenger)
    for mode in ("shadow", "canary"):
        c = cfg.model_copy(
            update={"rollout": cfg.rollout.model_copy(update={"mode": mode, "canary_fraction": 0.2})}
        )
        serve.run(deployment(c).bind(c.model_dump(mode="json")), name=mode, route_prefix=f"/{mode}")
    try:
        for mode in ("shadow", "canary"):
            assert wait_ready(f"{app.url}/{mode}", timeout=60)
        yield Rollout(cfg=cfg, champion=champion, challenger=challenger)
    finally:
        for mode in ("shadow", "canary"):
            serve.delete(mode)


def test_a_shadow_rollout_answers_with_the_champion_and_stores_the_challengers_figures(
    app, rollout_apps, capsys
):
    """Under concurrent load no request fails, every answer is the champion's, and the challenger
    scored the same requests off the response path; the replica's figures reach the rollout store
    and `hotdog rollout report` adds them up."""
    from hotdog_ray import rollout
    from hotdog_ray.cli import main

    cfg, champion, challenger = rollout_apps.cfg, rollout_apps.champion, rollout_apps.challenger
    load = subprocess.run(
        [sys.executable, str(REPO / "bench" / "loadgen.py"), f"{app.url}/shadow/predict"]
        + ["--requests", "400", "--concurrency", "8", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(load.stdout)["errors"] == 0, load.stdout + load.stderr[-2000:]
    data = encode(LEVELS["cat"], "RGB", "JPEG", (24, 24))
    seen = {app.post("/shadow/predict", data=data).json()["model"]["version"] for _ in range(50)}
    assert seen == {champion}

    def figures() -> dict:
        return requests.get(f"{app.url}/shadow/rollout", timeout=10).json()

    replica = wait_until(
        lambda: (f := figures())["shadowed"] >= 450 and f, timeout=30, interval=0.2, message=figures
    )
    assert replica["challenger"] == f"models:/rollout-model/{challenger}"
    stored = wait_until(
        lambda: (r := rollout.report(cfg, champion, challenger)).shadowed >= replica["shadowed"] and r,
        timeout=30,
        interval=0.2,
        message=lambda: rollout.report(cfg, champion, challenger).summary(),
    )
    assert stored.served == stored.shadowed and stored.canary == 0 and 0 <= stored.agreement <= 1
    assert all(ms > 0 for ms in stored.summary()["p50_latency_ms"].values())
    assert main(["rollout", "report", "--json", *set_args(rollout_args(cfg))]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["shadowed"] >= stored.shadowed and printed["challenger"] == challenger


def test_the_promotion_gate_refuses_a_challenger_below_the_rollout_limits(rollout_apps):
    """`hotdog promote --force` refuses below rollout.min_requests / min_agreement: the alias stays."""
    from hotdog_ray import rollout
    from hotdog_ray.promote import force

    cfg, champion, challenger = rollout_apps.cfg, rollout_apps.champion, rollout_apps.challenger
    stored = rollout.report(cfg, champion, challenger)

    def gated(**limits):
        return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update=limits)})

    refused = force(gated(min_requests=stored.shadowed + 10_000), challenger)
    assert not refused.promoted and "shadow requests" in refused.reason
    if stored.shadowed >= 10 and stored.agreement < 1:
        refused = force(gated(min_requests=10, min_agreement=1.0), challenger)
        assert not refused.promoted and "agreement" in refused.reason
    assert registry.alias_version(cfg.tracking) == champion


def test_a_canary_answers_its_share_with_the_challenger_and_says_which_answered(app, rollout_apps):
    """Canary at 0.2: over 1,000 requests the challenger answers a share within binomial bounds, and
    each answer names the version that gave it."""
    champion, challenger = rollout_apps.champion, rollout_apps.challenger
    data = encode(LEVELS["cat"], "RGB", "JPEG", (24, 24))
    answered = [app.post("/canary/predict", data=data).json()["model"]["version"] for _ in range(1000)]
    by_challenger = answered.count(challenger)
    assert set(answered) == {champion, challenger}
    assert 143 <= by_challenger <= 257, by_challenger  # 200 +- 4.5 standard deviations
    figures = requests.get(f"{app.url}/canary/rollout", timeout=10).json()
    assert figures["served_by_challenger"] == by_challenger


def test_batcher_takes_what_queued_while_a_batch_ran_one_batch_at_a_time():
    """Concurrent calls are grouped: the first batch starts at once, the next takes every call
    queued meanwhile up to max_size; never two batches at once; each caller gets its own result,
    a failed batch's error reaches each of its callers, and a caller that left is not run."""
    import asyncio

    from hotdog_ray.server.batching import MicroBatcher

    batches, running = [], []

    async def run(items):
        running.append(1)
        assert len(running) == 1, "two batches ran at once"
        batches.append(list(items))
        await asyncio.sleep(0.01)
        running.pop()
        if "bad" in items:
            raise ValueError("the model failed")
        return [f"answer {item}" for item in items]

    async def main():
        batcher = MicroBatcher(run, max_size=3)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.sleep(0)  # the first batch starts alone
        calls = [asyncio.ensure_future(batcher(i)) for i in range(1, 6)]
        gone = asyncio.ensure_future(batcher("gone"))
        await asyncio.sleep(0)
        gone.cancel()
        answers = await asyncio.gather(first, *calls)
        with pytest.raises(ValueError, match="the model failed"):
            await asyncio.gather(batcher("bad"), batcher(7))
        return answers

    answers = asyncio.run(main())
    assert answers == [f"answer {i}" for i in range(6)]
    assert batches == [[0], [1, 2, 3], [4, 5], ["bad", 7]]


def test_batcher_waits_to_fill_a_batch_only_when_told():
    """With wait_s, a batch that is not full waits for more (and a full one does not)."""
    import asyncio

    from hotdog_ray.server.batching import MicroBatcher

    batches = []

    async def run(items):
        batches.append(list(items))
        return items

    async def main(wait_s):
        batcher = MicroBatcher(run, max_size=4, wait_s=wait_s)
        calls = [asyncio.ensure_future(batcher(0))]
        await asyncio.sleep(0.02)
        calls += [asyncio.ensure_future(batcher(i)) for i in range(1, 6)]
        await asyncio.gather(*calls)

    asyncio.run(main(wait_s=0))
    assert batches == [[0], [1, 2, 3, 4], [5]]
    batches.clear()
    asyncio.run(main(wait_s=0.2))
    assert batches == [[0, 1, 2, 3], [4, 5]]


def test_a_cheap_lone_pass_runs_on_the_event_loop_and_anything_else_in_a_thread():
    """The first lone pass runs in a worker thread and is timed; a lone pass after a fast one runs
    on the loop; a batch of several always runs in a thread; a slow lone pass sends the next back."""
    import asyncio
    import threading
    import time

    from hotdog_ray.server.batching import PassRunner

    def where(seconds):
        time.sleep(seconds)
        return threading.get_ident()

    async def main():
        loop_thread = threading.get_ident()
        # A wide bound: a loaded CI machine's thread hop must not make a fast pass look slow.
        runner = PassRunner(inline_max_s=0.5)
        ran = [await runner(where, 0, lone=True), await runner(where, 0, lone=True)]
        ran.append(await runner(where, 0, lone=False))
        ran.append(await runner(where, 0.6, lone=True))  # inline, and too slow to be again
        ran.append(await runner(where, 0, lone=True))
        ran.append(await runner(where, 0, lone=True))
        return [t == loop_thread for t in ran]

    assert asyncio.run(main()) == [False, True, False, True, False, True]


class RecordingShadowQueue(ShadowQueue):
    """Shadow batching with no Serve and no model: each challenger pass recorded, not run."""

    def __init__(self, max_size: int) -> None:
        super().__init__(ctx=None, max_size=max_size)
        self.calls, self.running = [], 0

    async def score(self, jobs):
        self.running += 1
        assert self.running == 1, "two challenger batches ran at once"
        await asyncio.sleep(0.01)
        images = [int(j.image[0]) for j in jobs]
        self.calls.append((jobs[0].champion, [j.shadow.challenger for j in jobs], images))
        self.running -= 1


def test_shadow_work_runs_one_challenger_batch_at_a_time_per_replica():
    """Queued shadow work drains in batches of at most serve.max_batch_size, one at a time, each
    batch one champion-challenger pair; every queued image is scored once."""
    import asyncio
    from types import SimpleNamespace

    from hotdog_ray.server.context import Shadow
    from hotdog_ray.server.shadow import ShadowJob

    champions = ["champion-1", "champion-2"]
    challengers = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    shadows = [Shadow(challenger=c, request_id="r", image=b"") for c in challengers]

    def job(champion, shadow, i):
        return ShadowJob(champion=champion, shadow=shadow, image=np.array([i]), answer=np.zeros(2))

    async def main():
        queue = RecordingShadowQueue(max_size=4)
        # Three batches' worth arrives while the first challenger batch runs; a reload swaps the
        # challenger (b) and then the champion (champion-2) along the way.
        jobs = [job(champions[0], shadows[0], i) for i in range(6)]
        jobs += [job(champions[0], shadows[1], 6), job(champions[1], shadows[1], 7)]
        for j in jobs[:2]:
            queue.offer(j)
        await asyncio.sleep(0)
        for j in jobs[2:]:
            queue.offer(j)
        await queue.drained()
        return queue.calls

    calls = asyncio.run(main())
    assert sorted(i for _, _, images in calls for i in images) == list(range(8))
    assert all(len({id(c) for c in chall}) == 1 for _, chall, _ in calls)  # one challenger a batch
    assert calls[0][2] == [0, 1]  # the first batch did not wait for more
    assert calls[1][2] == [2, 3, 4, 5]  # the next took what queued meanwhile, up to the limit
    assert [(champion, chall[0].name) for champion, chall, _ in calls[1:]] == [
        ("champion-1", "a"),
        ("champion-1", "b"),
        ("champion-2", "b"),
    ]


def rollout_args(cfg) -> list[str]:
    return [
        f"tracking.uri={cfg.tracking.uri}",
        f"tracking.registered_model={cfg.tracking.registered_model}",
        f"rollout.store={cfg.rollout.store}",
    ]


def images_as_documented(min_side: int):
    """A Hypothesis strategy of image files as the schema describes them: any of the listed
    formats and modes, at least ``min_side`` pixels a side (JSON Schema cannot say "a decodable
    image of this size", so the schema says it in words and this generator follows them)."""
    from hypothesis import strategies as st

    @st.composite
    def image(draw) -> bytes:
        w, h = draw(st.integers(min_side, 48)), draw(st.integers(min_side, 48))
        fmt = draw(st.sampled_from(["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"]))
        mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"] if fmt != "JPEG" else ["RGB", "L", "CMYK"]))
        seed = draw(st.integers(0, 2**16))
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
        return buf.getvalue()

    return image()


def test_the_api_matches_its_openapi_schema(app):
    """schemathesis reads the live app's /openapi.json and sends what it describes: no server error,
    every status, header and body as documented, and every schema-valid request accepted."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.formats import unregister_string_format
    from schemathesis.specs.openapi.media_types import unregister_all
    from schemathesis.transport.serialization import Binary

    images = images_as_documented(app.cfg.data.min_image_side)
    schemathesis.openapi.format("binary", images.map(Binary))
    schemathesis.openapi.media_type("image/*", images, aliases=["application/octet-stream"])
    try:
        schema = schemathesis.openapi.from_url(app.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/predict", "/predict/batch", "/explain", "/healthz"}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
            )
            def check(case):
                case.call_and_validate(timeout=30)

            check()
    finally:
        unregister_string_format("binary")
        unregister_all()  # the media types registered above


def test_web_page_in_headless_chromium(app, tmp_path):
    """Pick a photo on the page: the label, the probabilities and the heatmap appear."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "dog.jpg"
    photo.write_bytes(encode(LEVELS["dog"], "RGB", "JPEG", (60, 40)))
    expected = app.offline(_current_version(app)).predict(photo.read_bytes())
    with browser_session(tmp_path) as driver:
        driver.get(app.url + "/")
        WebDriverWait(driver, 30).until(lambda d: "version" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 60).until(
            lambda d: (
                (d.find_element(By.ID, "heatmap").get_attribute("src") or "").startswith("data:image/png")
                or d.find_element(By.ID, "error").text
            )
        )
        assert driver.find_element(By.ID, "verdict").text == expected.label
        assert driver.find_element(By.ID, "error").text == ""
        rows = driver.find_elements(By.CSS_SELECTOR, "#probs .row")
        assert rows and rows[0].text.startswith(expected.label)
        # the heatmap really is an image the browser decoded
        assert driver.execute_script("return document.getElementById('heatmap').naturalWidth") == 60


def _current_version(app) -> str:
    return requests.get(app.url + "/model", timeout=10).json()["version"]
