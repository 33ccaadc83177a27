"""Drift against the training reference, and progress lines on long jobs: the pure parts alone,
then a model trained for real, its validation images scored one night (no drift) and one class
only the next (drift flagged), through nightly scoring and ``hotdog drift``."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from hotdog_ray import drift
from hotdog_ray.cli import main
from hotdog_ray.config import MonitorSettings, load_config
from hotdog_ray.process import Progress, progress_line
from tests.helpers import mlflow_store
from tests.imagegen import CLASSES, write_image_tree


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0
    small, large = drift.psi([0.5, 0.5], [0.55, 0.45]), drift.psi([0.5, 0.5], [0.9, 0.1])
    assert 0 < small < 0.1 < 0.2 < large
    assert np.isfinite(drift.psi([0.5, 0.5], [1.0, 0.0]))  # an empty bin is floored, not infinite


def test_one_class_days_are_flagged_and_a_sample_of_the_reference_is_not():
    rng = np.random.default_rng(0)
    classes = ["hotdog", "not_hotdog"]
    settings = MonitorSettings()

    def answers(n: int, hotdog_share: float):
        labels = ["hotdog" if rng.random() < hotdog_share else "not_hotdog" for _ in range(n)]
        return labels, rng.uniform(0.7, 1.0, n)

    reference = drift.profile(*answers(2000, 0.4), classes, settings.low_confidence)
    same = drift.profile(*answers(500, 0.4), classes, settings.low_confidence)
    report = drift.compare(reference, same, settings, date="d1", source="scores", version="1")
    assert not report.flagged and report.psi_class < 0.02 and report.psi_confidence < 0.1
    one_class = drift.profile(*answers(500, 1.0), classes, settings.low_confidence)
    report = drift.compare(reference, one_class, settings, date="d2", source="scores", version="1")
    assert report.flagged and report.psi_class > settings.psi_threshold
    assert "class shares moved" in report.reasons[0] and "FLAGGED" in report.format()
    unsure = drift.profile(["hotdog"] * 200 + ["not_hotdog"] * 300, [0.55] * 500, classes, 0.6)
    report = drift.compare(reference, unsure, settings, date="d3", source="predictions", version="1")
    assert report.flagged and any("low-confidence" in r for r in report.reasons)


def test_a_day_of_out_of_distribution_answers_is_flagged_against_the_validation_rate():
    rng = np.random.default_rng(1)
    classes, settings = ["hotdog", "not_hotdog"], MonitorSettings()  # margin 0.1 over the validation rate

    def day(n: int, ood_share: float | None):
        labels = ["hotdog" if rng.random() < 0.5 else "not_hotdog" for _ in range(n)]
        flags = None if ood_share is None else list(rng.random(n) >= ood_share)
        return drift.profile(labels, rng.uniform(0.7, 1.0, n), classes, settings.low_confidence, flags)

    reference = day(2000, 0.05)  # 95% of the validation split accepted
    assert reference.ood_share == pytest.approx(0.05, abs=0.015)
    usual = drift.compare(reference, day(500, 0.08), settings, date="d1", source="predictions", version="1")
    assert not usual.flagged and usual.ood_share == pytest.approx(0.08, abs=0.03)
    strange = drift.compare(reference, day(500, 0.3), settings, date="d2", source="predictions", version="1")
    assert strange.flagged and any("out-of-distribution answers rose" in r for r in strange.reasons)
    assert "out-of-distribution share" in strange.format()
    # a reference of a model without the score, or a day without flags: nothing to compare
    old = drift.compare(day(2000, None), day(500, 0.9), settings, date="d3", source="scores", version="1")
    assert old.reference_ood_share is None and not any("out-of-distribution" in r for r in old.reasons)
    assert drift.ood_share([True, None, False, None]) == 0.5 and drift.ood_share([None]) is None


def test_progress_lines_come_at_the_interval_with_rate_and_time_left():
    now = [0.0]
    progress = Progress(1000, 10, "scored", clock=lambda: now[0])
    for done, t in ((100, 5.0), (250, 10.0), (400, 15.0), (800, 20.0)):
        now[0] = t
        progress.update(done)
    assert progress.lines == [
        "scored 250 of 1000 files (25%), 25.0 files/s, about 30 s left",
        "scored 800 of 1000 files (80%), 40.0 files/s, about 5 s left",
    ]
    assert progress_line("scored", 5, 5, 2.0).endswith("done")


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """A first_cnn trained on gray levels (one per class) until it tells them apart, registered."""
    from hotdog_ray.registry import set_alias
    from hotdog_ray.train import run_training

    tmp = tmp_path_factory.mktemp("drift")
    tree = write_image_tree(tmp / "images", {"train": 7, "validation": 6, "test": 6})
    cfg = load_config(
        None,
        [
            f"data.root={tree.root}",
            "data.image_size=16",
            "model.name=first_cnn",
            "model.filters=4",
            "train.num_workers=0",
            "train.batch_size=8",
            "train.epochs=20",
            "train.learning_rate=0.01",
            f"train.storage_path={tmp / 'ckpt'}",
            f"tracking.uri={mlflow_store(tmp)}",
            f"score.output={tmp / 'scores'}",
            "score.cpus_per_actor=0.5",
            "monitor.progress_interval_s=0.01",
        ],
    )
    out = run_training(cfg, run_name="drift-reference")
    set_alias(cfg.tracking, out.model_version)
    return cfg, tree, out


def test_nightly_scoring_flags_a_one_class_night_and_not_a_validation_night(trained, caplog, capsys):
    from hotdog_ray.score import score

    cfg, tree, out = trained
    reference = drift.reference_for(cfg, out.model_version)
    assert reference.n == tree.good_count("validation") and sum(
        reference.class_share.values()
    ) == pytest.approx(1)
    assert max(reference.class_share.values()) < 0.5  # the model tells the classes apart

    with caplog.at_level(logging.INFO, logger="hotdog_ray.process"):
        night = score(cfg, input=str(tree.root / "validation"), date="2026-11-01")
    assert night.drift["flagged"] is False and night.drift["n"] == night.scored
    assert night.drift["psi_class"] < 0.05  # the same photos, through scoring instead of training
    assert any(
        "scored" in r.message and "files" in r.message
        for r in caplog.records
        if r.name == "hotdog_ray.process"
    )

    one_class = score(cfg, input=str(tree.root / "test" / "hotdog"), date="2026-11-02")
    assert one_class.drift["flagged"] is True
    summary = json.loads((tree.root.parent / "scores" / "date=2026-11-02" / "_summary.json").read_text())
    assert summary["drift"]["flagged"] is True and summary["drift"]["class_share"]["hotdog"] > 0.9

    capsys.readouterr()
    set_args = ["--set", f"tracking.uri={cfg.tracking.uri}", "--set", f"score.output={cfg.score.output}"]
    assert main(["drift", "--date", "2026-11-02", "--source", "scores", "--json", *set_args]) == 3
    assert json.loads(capsys.readouterr().out)["flagged"] is True
    assert main(["drift", "--date", "2026-11-01", "--source", "scores", *set_args]) == 0
    assert "no drift" in capsys.readouterr().out
    assert set(CLASSES) == set(reference.classes)


def test_progress_bars_stay_off_unless_asked_for():
    from ray.data import DataContext

    from hotdog_ray.runtime import quiet_ray_data, show_progress_bars

    try:
        quiet_ray_data()
        assert DataContext.get_current().enable_progress_bars is False
        show_progress_bars(True)  # hotdog score/inspect --progress
        quiet_ray_data()
        assert DataContext.get_current().enable_progress_bars is True
    finally:
        show_progress_bars(False)
        quiet_ray_data()
