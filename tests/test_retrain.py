"""Closing the loop for real, on the digits sample: the served champion answers inverted digits
(a shifted distribution the test makes), the clients send their true labels, and ``hotdog retrain``
exports them and fine-tunes the champion into a challenger that reads inverted digits better; with no
trigger it changes nothing. The export's arithmetic alone first."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from hotdog_ray import feedback, feedback_loop, gate, registry, storage
from hotdog_ray.cli import main
from hotdog_ray.predict import Predictor
from hotdog_ray.retrain import FROM_TAG, TRIGGER_TAG
from tests.helpers import SteadyClients, serve_app, set_args, stop_command, wait_until


def test_labelled_answers_are_the_clients_latest_labels_once_per_image():
    rows = [
        {"request_id": "a", "served_by": "champion", "sha256": "s1", "label": "cat", "probability": 0.99},
        {"request_id": "a", "served_by": "shadow", "sha256": "s1", "label": "dog", "probability": 0.6},
        {"request_id": "b", "served_by": "champion", "sha256": "s1", "label": "cat", "probability": 0.9},
        {"request_id": "c", "served_by": "challenger", "sha256": "s2", "label": "dog", "probability": 0.7},
        {"request_id": "d", "served_by": "champion", "sha256": "s3", "label": "dog", "probability": 0.7},
    ]
    labels = [
        {"request_id": "a", "label": "dog", "time": 1.0},
        {"request_id": "b", "label": "hotdog", "time": 3.0},  # the same image again, later: this wins
        {"request_id": "c", "label": "dog", "time": 2.0},
        {"request_id": "zzz", "label": "cat", "time": 2.5},  # an answer the log does not have
    ]
    got = feedback.labelled(rows, labels)
    assert [(x.sha256, x.label, x.answered) for x in got] == [("s2", "dog", "dog"), ("s1", "hotdog", "cat")]
    assert got[1].probability == 0.9  # the answer the label was given to


def inverted(path: Path) -> bytes:
    """The digit as a negative: dark strokes on white, a distribution the sample never had."""
    pixels = 255 - np.asarray(Image.open(path).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def accuracy(predictor: Predictor, files: list[Path]) -> float:
    answers = [predictor.predict(inverted(f)).label for f in files]
    return float(np.mean([a == f.parent.name for a, f in zip(answers, files)]))


@pytest.fixture(scope="module")
def served(digits):
    """The champion served with a shadow rollout: a challenger, once there is one, scores every
    request too; replicas poll the aliases twice a second and write their figures as often."""
    cfg = digits.cfg.model_copy(deep=True)
    cfg.rollout.mode, cfg.rollout.flush_interval_s, cfg.serve.reload_interval_s = "shadow", 0.5, 0.5
    with serve_app(cfg, "retrain") as url:
        yield url


def test_labelled_inverted_digits_retrain_the_champion_into_a_better_challenger(digits, served, capsys):
    cfg, t = digits.cfg, digits.cfg.tracking
    champion = registry.alias_version(t)
    versions = len(registry.client(t).search_model_versions(f"name='{t.registered_model}'"))
    sets = set_args(
        [
            f"tracking.uri={t.uri}",
            f"data.root={cfg.data.root}",
            f"data.cache.root={cfg.data.cache.root}",
            f"train.storage_path={cfg.train.storage_path}",
            f"prediction_log.location={cfg.prediction_log.location}",
            "train.num_workers=0",
            "loop.min_new_labels=150",
            "loop.epochs=4",
        ]
    )
    # No labels yet, no drift: nothing happens, and one line says why.
    assert main(["retrain", *sets]) == 0
    assert capsys.readouterr().out.strip().startswith("no trigger")
    assert registry.alias_version(t, t.challenger_alias) is None
    assert len(registry.client(t).search_model_versions(f"name='{t.registered_model}'")) == versions

    train = sorted((Path(cfg.data.root) / "train").rglob("*.png"))[::6]  # about 210, every class
    held_out = digits.test_files
    before = accuracy(digits.predictor, held_out)
    with requests.Session() as http:
        for f in train:
            answer = http.post(
                served + "/predict", data=inverted(f), headers={"Content-Type": "image/png"}, timeout=60
            ).json()
            sent = http.post(
                served + "/feedback",
                json={"request_id": answer["request_id"], "label": f.parent.name},
                timeout=60,
            )
            assert sent.status_code == 202, sent.text

    def all_labelled() -> bool:
        return len(feedback.read_labelled(cfg)) == len(train)

    wait_until(
        all_labelled, timeout=60, interval=0.5, message=lambda: f"{len(feedback.read_labelled(cfg))} labelled"
    )

    assert main(["retrain", "--json", *sets]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["retrained"] and outcome["champion"] == champion
    assert f"{len(train)} new labelled images" in outcome["reason"]
    export = outcome["export"]
    assert export["exported"] == len(train) and export["missing_image"] == 0 and export["unknown_label"] == 0
    candidate = outcome["candidate"]
    assert registry.alias_version(t) == champion  # the champion stays until a gate promotes
    assert registry.alias_version(t, t.challenger_alias) == candidate
    tags = registry.client(t).get_model_version(t.registered_model, candidate).tags
    assert tags[FROM_TAG] == champion and "labelled images" in tags[TRIGGER_TAG]
    # an export run again copies nothing twice
    again = feedback.export(cfg, digits.predictor.classes)
    assert (again.exported, again.already) == (0, len(train))
    folder = storage.resolve(export["folder"])
    assert len(storage.list_files(folder)) == len(train)
    # the candidate reads inverted digits it never saw far better than the champion did
    after = accuracy(
        Predictor.from_config(cfg, f"models:/{t.registered_model}/{candidate}", device="cpu"), held_out
    )
    assert after > before + 0.2, (before, after)


def test_a_loop_killed_while_it_shadows_leaves_one_challenger_the_champion_and_every_label(
    digits, tmp_path, joining_env
):
    """``hotdog loop`` killed (SIGKILL, no clean-up) while it waits for shadow traffic: the champion
    is where it was, the one challenger is still the candidate, nothing was judged, no label lost."""
    cfg, t = digits.cfg, digits.cfg.tracking
    champion, challenger = registry.alias_version(t), registry.alias_version(t, t.challenger_alias)
    assert challenger is not None, "runs after the retraining test above, which leaves a challenger"
    labels = len(feedback.read_labelled(cfg))
    log = tmp_path / "loop.log"
    overrides = [
        f"tracking.uri={t.uri}",
        f"data.root={cfg.data.root}",
        f"data.cache.root={cfg.data.cache.root}",
        f"prediction_log.location={cfg.prediction_log.location}",
        f"rollout.store={cfg.rollout.store}",
        "loop.min_live_requests=1000000",  # more shadow traffic than will ever come: it waits
        "loop.poll_interval_s=0.2",
    ]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "hotdog"), "loop", *set_args(overrides)],
        env=joining_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: "shadow requests" in log.read_text(), timeout=90, interval=0.2, message=log.read_text
        )
        assert f"taking up challenger version {challenger}" in log.read_text()
    finally:
        stop_command(proc)  # SIGKILL: the hardest stop
    assert registry.alias_version(t) == champion
    assert registry.alias_version(t, t.challenger_alias) == challenger
    assert gate.recorded(cfg, challenger) == {}  # never judged, so never promoted
    assert len(feedback.read_labelled(cfg)) == labels


def test_the_loop_shadows_the_challenger_gates_it_and_promotes_it_with_no_failed_request(
    digits, served, tmp_path
):
    """Takes up the challenger the test above retrained (as a loop killed after retraining would
    leave it), shadows it on live requests, gates it on a test split with inverted digits in it, and
    moves the champion alias; every request answered while the replicas swap; then a loop with
    nothing new changes nothing."""
    cfg, t = digits.cfg, digits.cfg.tracking
    champion, challenger = registry.alias_version(t), registry.alias_version(t, t.challenger_alias)
    assert challenger is not None and challenger != champion
    # the gate's test split: the digits' own test images and their negatives
    for f in digits.test_files:
        folder = tmp_path / "test" / f.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f.name).write_bytes(f.read_bytes())
        (folder / f"inverted-{f.name}").write_bytes(inverted(f))
    looped = cfg.model_copy(deep=True)
    looped.loop.min_live_requests, looped.loop.poll_interval_s, looped.loop.shadow_deadline_s = 40, 0.5, 120
    clients = SteadyClients(served + "/predict", inverted(digits.test_files[0]), count=2)
    try:
        outcome = feedback_loop.run_loop(looped, data_root=str(tmp_path))
        wait_until(
            lambda: requests.get(served + "/model", timeout=10).json()["version"] == challenger,
            timeout=30,
            interval=0.25,
        )
        switched = len(clients.outcomes)
        wait_until(lambda: len(clients.outcomes) >= switched + 10, timeout=30, interval=0.1)  # and after
    finally:
        clients.stop()
    assert outcome.state == "promoted", outcome.gate
    assert outcome.candidate == challenger and not outcome.retrained and outcome.shadow_requests >= 40
    assert registry.alias_version(t) == challenger and registry.alias_version(t, t.challenger_alias) is None
    assert gate.recorded(cfg, challenger)[gate.GATE_TAG] == "passed"
    failed = [o for o in clients.outcomes if o[2] != "200"]
    assert clients.outcomes and not failed, failed[:3]
    # Nothing new since the new champion: the loop changes nothing.
    again = feedback_loop.run_loop(looped)
    assert again.state == "unchanged" and again.champion == challenger and "no trigger" in again.reason
    assert registry.alias_version(t, t.challenger_alias) is None
