"""Closing the loop for real, on the digits sample: the served champion answers inverted digits
(a shifted distribution the test makes), the clients send their true labels, and ``hotdog retrain``
exports them and fine-tunes the champion into a challenger that reads inverted digits better; with no
trigger it changes nothing. The export's arithmetic alone first."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from hotdog_ray import feedback, registry, storage
from hotdog_ray.cli import main
from hotdog_ray.predict import Predictor
from hotdog_ray.retrain import FROM_TAG, TRIGGER_TAG
from tests.helpers import serve_app, set_args, wait_until


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
    with serve_app(digits.cfg, "retrain") as url:
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
            "retrain.min_new_labels=150",
            "retrain.epochs=4",
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
