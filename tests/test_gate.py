"""The promotion gate: its arithmetic alone, then for real on the digits sample: a copy of the
champion passes every check, and a candidate trained with one class's labels scattered over the
others fails the slice check, leaves the champion where it is, and says so in the registry, in
MLflow and in ``hotdog rollout report``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hotdog_ray import gate, model_store, registry, tracking
from hotdog_ray.cli import main
from hotdog_ray.config import LoopSettings
from hotdog_ray.promote import set_challenger
from hotdog_ray.train import run_training
from tests.helpers import set_args


def test_recall_balanced_accuracy_and_the_bootstrap_interval():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    assert gate.per_class_recall(y, pred, 4) == [0.75, 1.0, 0.0, None]
    assert gate.balanced_accuracy(y, pred, 4) == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    big_y = np.random.default_rng(0).integers(0, 2, 2000)
    right = np.random.default_rng(1).random(2000) < 0.8  # 80% right
    big_pred = np.where(right, big_y, 1 - big_y)
    low, high = gate.bootstrap_interval(big_y, big_pred, lambda t, p: float(np.mean(t == p)), 500)
    assert low < np.mean(big_y == big_pred) < high and high - low < 0.05


def test_perturbations_keep_the_shape_and_change_the_pixels():
    images = np.random.default_rng(0).integers(0, 200, (3, 16, 16, 3), dtype=np.uint8)
    for name, change in gate.PERTURBATIONS.items():
        out = change(images)
        assert out.shape == images.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, images), name
    assert np.array_equal(gate.flip(gate.flip(images)), images)


def test_the_offline_checks_name_what_failed():
    settings = LoopSettings(bootstrap_samples=100)
    y = np.array([0] * 50 + [1] * 50)
    champion = gate.Answers(y.copy(), {name: y.copy() for name in gate.PERTURBATIONS})
    same = gate.offline_checks(y, champion, champion, ["a", "b"], settings)
    assert all(c.passed for c in same) and {c.name for c in same} >= {"accuracy", "recall of b"}
    lost_b = y.copy()
    lost_b[50:60] = 0  # recall of b 0.8 (a drop of 0.2), accuracy 0.9 (a drop of 0.1)
    fragile = {name: 1 - lost_b for name in gate.PERTURBATIONS}  # every perturbation flips the label
    checks = gate.offline_checks(y, gate.Answers(lost_b, fragile), champion, ["a", "b"], settings)
    failed = {c.name for c in checks if not c.passed}
    assert failed == {
        "accuracy",
        "balanced accuracy",
        "recall of b",
        *(f"same label under {name}" for name in gate.PERTURBATIONS),
    }
    report = gate.GateReport("2", "1", checks)
    assert not report.passed and "recall of b" in report.reason() and "FAIL" in report.format()


def test_a_copy_of_the_champion_passes_and_a_candidate_that_lost_a_class_is_refused(digits, tmp_path, capsys):
    cfg = digits.cfg
    t = cfg.tracking
    champion = registry.alias_version(t)
    # The champion's own model registered again: equal answers pass every check.
    with tracking.run(t, name="copy") as run:
        bundle = digits.predictor.bundle
        model_store.log_model(run, bundle.model, bundle.meta, bundle.ood_bank)
    copy = model_store.register(t, run.id)
    assert main(["gate", copy, *_sets(cfg)]) == 0
    assert "every check passed" in capsys.readouterr().out
    # The training images of "3" scattered over the other classes: the candidate never learns a 3.
    data = tmp_path / "data"
    shutil.copytree(cfg.data.root, data)
    threes = sorted((data / "train" / "3").iterdir())
    others = [d for d in sorted((data / "train").iterdir()) if d.name != "3"]
    for i, f in enumerate(threes):
        f.rename(others[i % len(others)] / f"was3-{f.name}")
    worse_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(data)})})
    worse = run_training(worse_cfg, run_name="lost-a-class").model_version
    assert registry.alias_version(t) == champion  # training never moves the alias
    # The gate compares on the true test split (data.root), where 3s are still 3s.
    assert main(["gate", worse, *_sets(cfg)]) == 4
    out = capsys.readouterr().out
    assert "FAIL" in out and "recall of 3" in out
    assert registry.alias_version(t) == champion
    recorded = gate.recorded(cfg, worse)
    assert recorded[gate.GATE_TAG] == "failed" and "recall of 3" in recorded[gate.REASONS_TAG]
    assert recorded[gate.CHAMPION_TAG] == champion
    runs = registry.client(t).search_runs(
        [registry.client(t).get_experiment_by_name(t.experiment).experiment_id],
        f"tags.kind = 'gate' and tags.version = '{worse}'",
    )
    assert len(runs) == 1 and runs[0].data.metrics["gate_passed"] == 0
    set_challenger(cfg, worse)
    try:
        assert main(["rollout", "report", *_sets(cfg)]) == 0
        out = capsys.readouterr().out
        assert f"gate: failed against champion version {champion}" in out and "recall of 3" in out
    finally:
        set_challenger(cfg, None)


def _sets(cfg) -> list[str]:
    """The fixture's store, data and logs as the CLI's --set arguments."""
    return set_args(
        [
            f"tracking.uri={cfg.tracking.uri}",
            f"data.root={cfg.data.root}",
            f"data.cache.root={cfg.data.cache.root}",
            f"rollout.store={cfg.rollout.store}",
            f"prediction_log.location={cfg.prediction_log.location}",
        ]
    )
