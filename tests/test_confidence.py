"""Temperature scaling, calibration measures and the out-of-distribution score: the pure parts."""

from __future__ import annotations

import numpy as np
import pytest

from hotdog_ray import confidence
from hotdog_ray.confidence import Calibration


def _overconfident(n: int, true_temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / T): a model over-confident by T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (n, 5))
    probs = confidence.softmax(logits, true_temperature)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    return logits, labels


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    logits, labels = _overconfident(20_000, 2.5)
    assert confidence.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.08)
    assert confidence.fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_scaling_lowers_ece_and_brier_and_keeps_every_argmax():
    logits, labels = _overconfident(5_000, 2.5, seed=1)
    rng = np.random.default_rng(2)
    bank, features = confidence.normalise(rng.normal(size=(300, 16))), rng.normal(size=(5_000, 16))
    calibration = confidence.calibrate(logits, labels, features, bank, acceptance=0.95)
    scaled = confidence.softmax(logits, calibration.temperature)
    scores = confidence.knn_score(features, bank, calibration.neighbours)
    report = confidence.calibration_report(scaled, labels, calibration, scores)
    assert report["ece"] < report["ece_uncalibrated"] / 3
    assert report["brier"] < report["brier_uncalibrated"]
    assert (scaled.argmax(axis=1) == logits.argmax(axis=1)).all()
    # the threshold was set on these very images: they are accepted at the configured rate
    assert report["in_distribution_rate"] == pytest.approx(0.95, abs=0.002)


def test_unscaling_recovers_the_raw_probabilities():
    logits, _ = _overconfident(50, 1.0)
    assert confidence.uncalibrated(confidence.softmax(logits, 3.0), 3.0) == pytest.approx(
        confidence.softmax(logits), abs=1e-9
    )


def test_ece_is_zero_when_confidence_equals_accuracy_and_the_brier_score_of_certainty_is_zero():
    probs = np.array([[0.75, 0.25]] * 4)
    assert confidence.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0)
    assert confidence.expected_calibration_error(probs, np.array([1, 1, 1, 1])) == pytest.approx(0.75)
    assert confidence.brier_score(np.eye(3), np.arange(3)) == 0
    bins = confidence.reliability_bins(np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45]]), np.array([0, 1, 0]))
    assert sum(b["share"] for b in bins) == pytest.approx(1)


def test_knn_scores_a_training_image_near_zero_and_matches_the_graphs_torch_version():
    import torch

    from hotdog_ray.models import knn_score

    rng = np.random.default_rng(0)
    train = rng.random((50, 8))  # post-ReLU features are non-negative
    bank = confidence.normalise(train)
    close = train[:3] * 2.0  # the same directions, another scale: cosine 1 to themselves
    assert confidence.knn_score(close, bank, k=1) == pytest.approx(0, abs=1e-6)
    assert (confidence.knn_score(close, bank, k=5) > 0).all()  # the 5th neighbour is another image
    far = np.zeros((2, 8))
    far[:, 0] = 1.0  # one feature alone lit: unlike the training images
    assert (confidence.knn_score(far, bank) > confidence.knn_score(train[:2], bank)).all()
    mixed = rng.random((6, 8))
    want = confidence.knn_score(mixed, bank, k=5)
    got = knn_score(torch.from_numpy(mixed).float(), torch.from_numpy(bank), 5).numpy()
    assert got == pytest.approx(want, abs=1e-6)
    assert confidence.knn_score(mixed, bank[:2], k=5) == pytest.approx(
        confidence.knn_score(mixed, bank[:2], k=2)
    )


def test_energy_is_minus_logsumexp_and_a_single_logit_is_symmetric():
    z = np.array([[2.0, -1.0, 0.5], [10.0, 10.0, 10.0]])
    assert confidence.energy_score(z) == pytest.approx(-np.log(np.exp(z).sum(axis=1)))
    one = np.array([[3.0], [-3.0], [0.5]])
    scores = confidence.energy_score(one)
    assert scores[0] == pytest.approx(scores[1])  # confident either way: equally familiar
    assert scores[2] > scores[0]  # the unsure one is less familiar
    assert confidence.softmax(one)[:, 1] == pytest.approx(1 / (1 + np.exp(-one[:, 0])))  # the sigmoid


def test_the_threshold_accepts_the_configured_share_and_old_models_flag_nothing():
    scores = np.random.default_rng(0).normal(size=1000)
    threshold = confidence.threshold_at(scores, 0.95)
    assert 0.95 <= np.mean(scores <= threshold) <= 0.95 + 1 / len(scores)  # at least, by one image at most
    old = Calibration.of({"name": "first_cnn"})  # a spec written before calibration
    assert (old.temperature, old.in_distribution(np.array([1e9])).all()) == (1.0, True)
    new = Calibration(temperature=1.7, ood_threshold=-3.0, acceptance=0.9)
    assert Calibration.of(new.meta()) == new
