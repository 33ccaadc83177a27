"""Seeing what the model does in production: the prediction log (local and on moto's S3, bounded
when storage is slow), and the hotdog_ metrics scraped from the node's Prometheus endpoint after
known requests to a real Serve app."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests

from hotdog_ray import predlog
from hotdog_ray.predlog import Entry, PredictionLog
from hotdog_ray.registry import set_alias
from hotdog_ray.server.launch import wait_ready
from tests.helpers import (
    SharedServe,
    png,
    register_model,
    scrape,
    set_args,
    tiny_model,
    tiny_model_config,
    total,
    wait_until,
)
from tests.imagegen import CLASSES


def entry(i: int, label: str = "hotdog") -> Entry:
    return Entry(
        request_id=f"r{i}",
        endpoint="/predict",
        model="hotdog-classifier",
        version="3",
        served_by="champion",
        label=label,
        probabilities={"hotdog": 0.75, "not_hotdog": 0.25},
        latency_ms=4.2,
        image=f"image {i}".encode(),
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_log_holds_exactly_what_was_offered(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        s3.client.create_bucket(Bucket="predlog")
        location = "s3://predlog/answers"
    else:
        location = str(tmp_path / "answers")
    plog = PredictionLog(location, flush_interval_s=0.2, log_images=True)
    for i in range(150):
        assert plog.offer(entry(i))
    wait_until(lambda: plog.written > 0, timeout=10, interval=0.05)  # a flush by the thread on its own
    for i in range(150, 230):
        plog.offer(entry(i))
    plog.close()  # the rest, at once

    table = predlog.read(location, time.strftime("%Y-%m-%d", time.gmtime()))
    assert table.num_rows == 230 and plog.written == 230 and plog.dropped == 0
    rows = table.to_pylist()
    assert sorted(r["request_id"] for r in rows) == sorted(f"r{i}" for i in range(230))
    first = next(r for r in rows if r["request_id"] == "r7")
    assert first["label"] == "hotdog" and first["probability"] == 0.75
    assert dict(first["probabilities"]) == {"hotdog": 0.75, "not_hotdog": 0.25}
    assert first["image_bytes"] == len(b"image 7") and first["model"] == "hotdog-classifier"
    import hashlib

    assert first["sha256"] == hashlib.sha256(b"image 7").hexdigest()
    from hotdog_ray import storage

    image = storage.resolve(location).join("images", first["sha256"])
    assert storage.read_bytes(image.fs, image.path) == b"image 7"


class SlowLog(PredictionLog):
    """A prediction log on storage far slower than traffic: each write takes a second."""

    def _write(self, entries):
        time.sleep(1.0)
        super()._write(entries)


def test_a_slow_writer_drops_and_counts_rows_and_never_blocks(tmp_path):
    dropped = []
    plog = SlowLog(str(tmp_path / "slow"), flush_interval_s=0.05, max_rows=100, on_drop=dropped.append)
    offered, slowest = 0, 0.0
    for i in range(5000):
        t0 = time.perf_counter()
        offered += plog.offer(entry(i))
        slowest = max(slowest, time.perf_counter() - t0)
    plog.close()
    assert plog.dropped == 5000 - offered and sum(dropped) == plog.dropped > 0
    assert plog.written == offered <= 200  # at most a queue's worth per slow write, never unbounded
    assert slowest < 0.05  # a request never waits on storage
    assert predlog.read(str(tmp_path / "slow")).num_rows == offered


def test_sampling_keeps_about_the_rate(tmp_path):
    plog = PredictionLog(str(tmp_path / "half"), sample_rate=0.5, flush_interval_s=60)
    kept = sum(plog.offer(entry(i)) for i in range(2000))
    plog.close()
    assert 850 < kept < 1150 and predlog.read(str(tmp_path / "half")).num_rows == kept


# --- a Serve app with the log and metrics on --------------------------------------------------------


@contextlib.contextmanager
def served_app(cfg, name: str, shared: SharedServe, env: dict[str, str] | None = None) -> Iterator[str]:
    """``cfg``'s Serve app ``name`` on the session's Serve (its replica with ``env``): its URL once
    ready, for the block; deleted after it (the replica's shutdown writes what its prediction log
    still holds)."""
    from ray import serve

    from hotdog_ray.server.launch import deployment

    url = shared.url
    dep = deployment(cfg)
    if env:
        dep = dep.options(ray_actor_options={**dep.ray_actor_options, "runtime_env": {"env_vars": env}})
    serve.run(dep.bind(cfg.model_dump(mode="json")), name=name, route_prefix="/")
    try:
        assert wait_ready(url, timeout=60)
        yield url
    finally:
        serve.delete(name)


def log_location(where: str, tmp_path: Path, request) -> tuple[Any, dict[str, str]]:
    """The prediction log's root (a folder, or a bucket on moto's S3) and the replica's env for it."""
    if where != "s3":
        return tmp_path / "predictions", {}
    s3 = request.getfixturevalue("s3")
    s3.client.create_bucket(Bucket="served")
    # The replica is a Ray worker started by a raylet that predates the S3 server's variables.
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL")
    return "s3://served/predictions", {k: os.environ[k] for k in keys}


def post_png(url: str, data: bytes, status: int) -> requests.Response:
    """POST /predict of ``data`` as a PNG; the answer, checked to have ``status`` (and, when 200, to
    carry its request id in the body and the X-Request-Id header)."""
    r = requests.post(url + "/predict", data=data, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["request_id"] == r.headers["x-request-id"]
    return r


@pytest.mark.parametrize("where", ["local", "s3"])
def test_known_requests_show_in_metrics_and_the_log(where, shared_serve, tmp_path, request):
    """N known requests to a real Serve app: the node's metrics endpoint counts them by status and
    class, with a batch-size observation each; the prediction log (a folder, or a bucket on moto's
    S3) holds exactly one row per answer once the app is deleted."""
    from hotdog_ray.predict import Predictor

    app_name = f"monitored-{where}"
    log_root, env = log_location(where, tmp_path, request)
    cfg = tiny_model_config(
        tmp_path,
        "serve.reload_interval_s=0",
        "serve.cpus_per_replica=0.25",
        f"prediction_log.location={log_root}",
        "prediction_log.flush_interval_s=0.5",
    )
    model = tiny_model(CLASSES, seed=3)
    _, version = register_model(cfg, model, CLASSES, name="monitored")
    set_alias(cfg.tracking, version)
    rng = np.random.default_rng(0)
    images = [png(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(12)]
    offline = Predictor.from_config(cfg, f"models:/{cfg.tracking.registered_model}/{version}", device="cpu")
    expected = Counter(offline.predict(img).label for img in images)

    with served_app(cfg, app_name, shared_serve, env) as url:
        ids = [post_png(url, img, 200).json()["request_id"] for img in images]
        for _ in range(3):  # refused: not an image
            post_png(url, b"nope", 422)
        mine = {"application": app_name}

        def requests_by_status() -> tuple[float, float]:
            by = {"endpoint": "/predict", **mine}
            return total(r"ray_hotdog_requests_total\{", status="200", **by), total(
                r"ray_hotdog_requests_total\{", status="422", **by
            )

        # Ray exports every few seconds.
        wait_until(
            lambda: requests_by_status() == (12, 3), timeout=60, interval=1, message=requests_by_status
        )
        for label, n in expected.items():
            assert total(r"ray_hotdog_predictions_total\{", label=label, **mine) == n
        assert total(r"ray_hotdog_errors_total\{", reason="bad_image", **mine) == 3
        # One request at a time: every image, the refused ones too (decoding is in the batch), was
        # a batch of one. (Ray approximates a histogram's _sum from bucket midpoints: not asserted.)
        assert total(r"ray_hotdog_batch_size_count\{", **mine) == 15
        assert total(r"ray_hotdog_batch_size_bucket\{", le="1.0", **mine) == 15
        assert total(r"ray_hotdog_request_latency_seconds_count\{", endpoint="/predict", **mine) == 15
        info = scrape(r"ray_hotdog_model_info\{")
        assert any(f'version="{version}"' in s and 'role="champion"' in s and v == 1 for s, v in info.items())
    rows = predlog.read(str(log_root)).to_pylist()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert Counter(r["label"] for r in rows) == expected
    assert {r["version"] for r in rows} == {version} and all(r["latency_ms"] > 0 for r in rows)


# --- rollouts from the prediction log, and feedback ------------------------------------------------


def log_row(rid: str, served_by: str, version: str, label: str, p: float = 0.9) -> dict:
    return {
        "request_id": rid,
        "served_by": served_by,
        "version": version,
        "label": label,
        "probability": p,
        "latency_ms": 3.0,
    }


def test_rollout_figures_and_accuracy_from_log_rows():
    from hotdog_ray import rollout

    rows = [
        log_row("a", "champion", "1", "hotdog"),
        log_row("a", "shadow", "2", "hotdog"),
        log_row("b", "champion", "1", "hotdog"),
        log_row("b", "shadow", "2", "not_hotdog"),
        log_row("c", "champion", "1", "not_hotdog"),  # its shadow never came back
        log_row("d", "challenger", "2", "hotdog"),  # a canary answer
        log_row("e", "champion", "0", "hotdog"),  # an older champion: not this pair
    ]
    stats = rollout.stats_from_log(rows, "1", "2")
    assert (stats.served, stats.canary, stats.shadowed, stats.agreed) == (3, 1, 2, 1)
    truth = {"a": "hotdog", "b": "not_hotdog", "c": "hotdog", "d": "hotdog", "e": "hotdog"}
    acc = rollout.accuracy(rows, truth, "1", "2")
    assert acc["champion"] == {"labelled": 3, "correct": 1, "accuracy": 1 / 3}
    assert acc["challenger"] == {"labelled": 3, "correct": 3, "accuracy": 1.0}


def answer_and_label(url: str, images: list[bytes], theirs: Any) -> tuple[dict, dict, dict]:
    """Each image answered (the champion's label), what the challenger ``theirs`` says of it, and a
    true label sent to POST /feedback: three dicts by request id."""
    ours, shadow, truth = {}, {}, {}
    for i, img in enumerate(images):
        rid = (answer := post_png(url, img, 200).json())["request_id"]
        ours[rid], shadow[rid] = answer["label"], theirs.predict(img).label
        truth[rid] = CLASSES[i % len(CLASSES)]
        r = requests.post(url + "/feedback", json={"request_id": rid, "label": truth[rid]}, timeout=30)
        assert r.status_code == 202 and r.json()["stored"] is True
    return ours, shadow, truth


def test_shadow_answers_and_feedback_give_each_version_its_accuracy(shared_serve, tmp_path, capsys):
    """A shadow rollout with the prediction log: the metrics count the shadow's answers by agreement
    and label, the log holds both versions' answers under one request id, POST /feedback stores true
    labels, and `hotdog rollout report --since today` gives agreement and each version's accuracy as
    the answers imply."""
    from hotdog_ray.cli import main
    from hotdog_ray.predict import Predictor
    from hotdog_ray.promote import set_challenger

    cfg = tiny_model_config(
        tmp_path,
        "serve.reload_interval_s=0",
        "serve.cpus_per_replica=0.25",
        "rollout.mode=shadow",
        f"prediction_log.location={tmp_path / 'log'}",
        "prediction_log.flush_interval_s=0.3",
        f"rollout.store={tmp_path / 'rollout'}",
    )
    _, champion = register_model(cfg, tiny_model(CLASSES, seed=11), CLASSES, name="champion")
    _, challenger = register_model(cfg, tiny_model(CLASSES, seed=12), CLASSES, name="challenger")
    set_alias(cfg.tracking, champion)
    set_challenger(cfg, challenger)
    theirs = Predictor.from_config(cfg, f"models:/{cfg.tracking.registered_model}/{challenger}", device="cpu")
    images = [png(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)) for i in range(10)]
    with served_app(cfg, "shadowed", shared_serve) as url:
        ours, shadow, truth = answer_and_label(url, images, theirs)
        bad = requests.post(url + "/feedback", json={"request_id": "no spaces", "label": "cat"}, timeout=30)
        documented = requests.get(url + "/openapi.json", timeout=10).json()["paths"]["/feedback"]["post"]
        assert bad.status_code == 422 and {"202", "404", "422", "503"} <= set(documented["responses"])
        # The shadow's answers reach the metrics too, counted per batch: agreement and labels.
        mine, agreed = {"application": "shadowed"}, sum(ours[r] == shadow[r] for r in ours)

        def answers() -> list[float]:
            return [total(r"ray_hotdog_shadow_answers_total\{", agreed=a, **mine) for a in ("true", "false")]

        expected_answers = [agreed, len(images) - agreed]
        wait_until(lambda: answers() == expected_answers, timeout=60, interval=1, message=answers)
        for label in CLASSES:
            n = sum(v == label for v in shadow.values())
            assert total(r"ray_hotdog_predictions_total\{", label=label, served_by="shadow", **mine) == n

        def shadow_rows() -> int:  # the shadow answers come after the responses, logged every 0.3 s
            rows = predlog.read(str(tmp_path / "log")).to_pylist() if (tmp_path / "log").exists() else []
            return sum(r["served_by"] == "shadow" for r in rows)

        wait_until(lambda: shadow_rows() == len(images), timeout=30, interval=0.3, message=shadow_rows)

    capsys.readouterr()
    args = set_args([f"tracking.uri={cfg.tracking.uri}", f"prediction_log.location={tmp_path / 'log'}"])
    assert main(["rollout", "report", "--since", "today", "--json", *args]) == 0
    check_rollout_report(json.loads(capsys.readouterr().out), ours, shadow, truth)


def check_rollout_report(report: dict, ours: dict, shadow: dict, truth: dict) -> None:
    """The report's agreement and each version's accuracy are what the answers imply."""
    n = len(ours)
    assert report["shadowed"] == n and report["served_by_champion"] == n
    assert report["agreement"] == pytest.approx(sum(ours[r] == shadow[r] for r in ours) / n)
    for role, answers in (("champion", ours), ("challenger", shadow)):
        expected = sum(answers[r] == truth[r] for r in truth) / len(truth)
        assert report["accuracy"][role]["labelled"] == n
        assert report["accuracy"][role]["accuracy"] == pytest.approx(expected)
