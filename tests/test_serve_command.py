"""``hotdog serve`` as a user runs it, on a Ray of its own: a module of its own because it shuts the
session's Ray down first (it runs last, with the other ``ray_head`` tests), after which no other
module's fixtures may still need that Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

from hotdog_ray.bundle import ModelBundle, model_meta, save_bundle
from hotdog_ray.config import load_config
from hotdog_ray.models import build_model
from hotdog_ray.predict import Predictor
from hotdog_ray.server.launch import HAPROXY_ENV, wait_ready
from tests.helpers import SteadyClients, free_port, listener, set_args, stop_command, wait_until
from tests.imagegen import CLASSES, LEVELS, encode


def hotdog_serve_command(tmp_path: Path, port: int) -> list[str]:
    """``hotdog serve`` of the bundle at ``tmp_path/bundle``, logging answers to ``tmp_path/answers``
    only at shutdown (the stop must write them all)."""
    settings = [
        f"serve.port={port}",
        "serve.cpus_per_replica=0.5",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"prediction_log.location={tmp_path / 'answers'}",
        "prediction_log.flush_interval_s=600",
    ]
    return [
        str(Path(sys.executable).parent / "hotdog"),
        "serve",
        "--model",
        str(tmp_path / "bundle"),
    ] + set_args(settings)


@pytest.mark.ray_head
@pytest.mark.e2e
def test_hotdog_serve_command_serves_a_bundle_and_drains_on_sigterm(tmp_path):
    """``hotdog serve`` as a user runs it: its own Ray, the page and the API on the configured port,
    a model given as a bundle folder; SIGTERM under load (what docker stop, systemd and Kubernetes
    send) drains it: every request in flight when the signal came is answered, and it exits 0. The
    prediction log, flushed only at shutdown here, then holds exactly one row per answer."""
    import signal

    import ray

    from hotdog_ray import predlog

    ray.shutdown()  # the command starts its own Ray, as on a laptop
    cfg = load_config(None, ["data.image_size=16", "model.name=first_cnn", "model.filters=4"])
    torch.manual_seed(3)
    model = build_model("first_cnn", len(CLASSES), 16, filters=4).eval()
    save_bundle(tmp_path / "bundle", model, model_meta(cfg, list(CLASSES)))
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    env = {k: v for k, v in os.environ.items() if k != HAPROXY_ENV}  # the config decides, not the suite's env
    proc = subprocess.Popen(
        hotdog_serve_command(tmp_path, port),
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(url, timeout=180, alive=lambda: proc.poll() is None)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        data = encode(LEVELS["cat"], "RGB", "JPEG", (30, 30))
        r = requests.post(url + "/predict", files={"file": ("cat.jpg", data)}, timeout=60)
        assert r.status_code == 200, r.text
        offline = Predictor(ModelBundle(model, model_meta(cfg, list(CLASSES))), device="cpu")
        assert r.json()["probabilities"] == pytest.approx(offline.predict(data).probabilities, abs=1e-5)
        assert "Is it a hotdog?" in requests.get(url + "/", timeout=10).text
        assert listener(port) == "haproxy"  # serve.haproxy's default in the Ray the command started

        clients = SteadyClients(url + "/predict", data)
        wait_until(lambda: len(clients.outcomes) >= 20, timeout=30, interval=0.05)  # under load
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to the command itself, as a process manager does
        try:
            code = proc.wait(timeout=90)
        finally:
            clients.stop()
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        in_flight = [o for o in clients.outcomes if o[0] < signalled]
        assert any(o[1] > signalled for o in in_flight), "no request was in flight at the signal"
        assert {o[2] for o in in_flight} == {"200"}, sorted({o[2] for o in in_flight})
        # Every answer a client got is in the log; at most the requests whose answer the stop cut
        # off on its way back are in it besides.
        answered = [r.json()["request_id"], *clients.answered_ids]
        logged = predlog.read(str(tmp_path / "answers"))["request_id"].to_pylist()
        assert len(set(logged)) == len(logged) and set(answered) <= set(logged)
        assert len(logged) - len(answered) <= sum(o[2] != "200" for o in clients.outcomes)
    finally:
        stop_command(proc, own_ray=True)
