"""Closing the loop for real, on the digits sample: the served champion answers inverted digits
(a shifted distribution the test makes), the clients send their true labels, and ``hotdog retrain``
exports them and fine-tunes the champion into a challenger that reads inverted digits better; with no
trigger it changes nothing. The export's arithmetic alone first."""

from __future__ import annotations

import io
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
def served(digits, shared_serve):
    """The champion served with a shadow rollout: a challenger, once there is one, scores every
    request too; replicas poll the aliases twice a second and write their figures as often."""
    cfg = digits.cfg.model_copy(deep=True)
    cfg.rollout.mode, cfg.rollout.flush_interval_s, cfg.serve.reload_interval_s = "shadow", 0.5, 0.5
    with serve_app(cfg, "retrain", shared_serve) as url:
        yield url


def loop_settings(cfg, *more: str) -> list[str]:
    """The fixture's store, data and logs, the loop's thresholds for a quick run, as --set arguments."""
    return set_args(
        [
            f"tracking.uri={cfg.tracking.uri}",
            f"data.root={cfg.data.root}",
            f"data.cache.root={cfg.data.cache.root}",
            f"train.storage_path={cfg.train.storage_path}",
            f"prediction_log.location={cfg.prediction_log.location}",
            f"rollout.store={cfg.rollout.store}",
            "train.num_workers=0",
            "loop.min_new_labels=150",
            "loop.epochs=4",
            *more,
        ]
    )


def versions(cfg) -> int:
    return len(registry.client(cfg.tracking).search_model_versions(f"name='{cfg.tracking.registered_model}'"))


def test_with_no_labels_and_no_drift_the_loop_exits_0_and_changes_nothing(digits, capsys):
    cfg, t = digits.cfg, digits.cfg.tracking
    champion, before = registry.alias_version(t), versions(cfg)
    assert main(["loop", *loop_settings(cfg)]) == 0
    assert "nothing changed (no trigger" in capsys.readouterr().out
    assert main(["retrain", *loop_settings(cfg)]) == 0
    assert capsys.readouterr().out.strip().startswith("no trigger")
    assert registry.alias_version(t) == champion and registry.alias_version(t, t.challenger_alias) is None
    assert versions(cfg) == before


def test_labelled_inverted_digits_start_the_loop_which_killed_while_it_shadows_stays_consistent(
    digits, served, tmp_path, joining_env
):
    """Clients label the champion's answers on inverted digits (a distribution it never saw); ``hotdog
    loop`` retrains the champion on them into the challenger and waits for shadow traffic, where the
    test kills it (SIGKILL, no clean-up): the champion is where it was, the one challenger is the
    fine-tune, nothing was judged, no label lost, and the fine-tune reads inverted digits it never saw
    far better than the champion."""
    cfg, t = digits.cfg, digits.cfg.tracking
    champion = registry.alias_version(t)
    train = sorted((Path(cfg.data.root) / "train").rglob("*.png"))[::6]  # about 210, every class
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
    wait_until(
        lambda: len(feedback.read_labelled(cfg)) == len(train),
        timeout=60,
        interval=0.5,
        message=lambda: f"{len(feedback.read_labelled(cfg))} labelled",
    )

    log = tmp_path / "loop.log"
    more = ["loop.min_live_requests=1000000", "loop.poll_interval_s=0.2"]  # more than will ever come
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "hotdog"), "loop", *loop_settings(cfg, *more)],
        env=joining_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: "shadow requests" in log.read_text() or proc.poll() is not None,
            timeout=240,
            interval=0.2,
            message=lambda: log.read_text()[-3000:],
        )
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop_command(proc)  # SIGKILL: the hardest stop

    candidate = registry.alias_version(t, t.challenger_alias)
    assert registry.alias_version(t) == champion and candidate not in (None, champion)
    tags = registry.client(t).get_model_version(t.registered_model, candidate).tags
    assert tags[FROM_TAG] == champion and f"{len(train)} new labelled images" in tags[TRIGGER_TAG]
    assert gate.recorded(cfg, candidate) == {}  # never judged, so never promoted
    assert len(feedback.read_labelled(cfg)) == len(train)
    (folder,) = feedback.exported_folders(cfg)
    assert len(storage.list_files(storage.resolve(folder))) == len(train)  # each labelled image once
    again = feedback.export(cfg, digits.predictor.classes)
    assert (again.exported, again.already, again.missing_image) == (0, len(train), 0)
    before = accuracy(digits.predictor, digits.test_files)
    after = accuracy(
        Predictor.from_config(cfg, f"models:/{t.registered_model}/{candidate}", device="cpu"),
        digits.test_files,
    )
    assert after > before + 0.2, (before, after)


def test_the_loop_shadows_the_challenger_gates_it_and_promotes_it_with_no_failed_request(
    digits, served, tmp_path
):
    """Run again after the kill above, the loop takes up the challenger it had retrained, shadows it
    on live requests, gates it on a test split with inverted digits in it, and moves the champion
    alias; every request is answered while the replicas swap; then a turn with nothing new changes
    nothing."""
    cfg, t = digits.cfg, digits.cfg.tracking
    champion, challenger = registry.alias_version(t), registry.alias_version(t, t.challenger_alias)
    assert challenger not in (None, champion), "runs after the killed loop above, which left a challenger"
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
