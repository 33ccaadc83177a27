"""How far to trust an answer: temperature scaling and the out-of-distribution score (pure numpy).

**Calibration.** A CNN's confidence is rarely its accuracy: trained long on cross-entropy it
tends to over-confidence, with strong dropout and augmentation to under-confidence. Temperature
scaling (Guo et al., 2017) divides the logits by one number ``T`` fitted on the validation split to
minimise its negative log-likelihood (above 1 softens the answers, below 1 sharpens them); the
argmax, and so the accuracy, stays. :func:`expected_calibration_error` and :func:`brier_score` measure the effect.

**Out of distribution.** The score is the distance to the ``k``-th nearest training image in the
model's own feature space (deep nearest neighbours, Sun et al., 2022): the last convolution's
activations, averaged over the image and L2-normalised, against a bank of at most
:data:`BANK_SIZE` training images' features stored with the model; the score is ``1 - cos`` to
the ``k``-th neighbour, higher meaning less like the training data. The last convolution exists in
every zoo model (Grad-CAM reads it too) and its channels are few (tens to 512), so a request costs
one (bank x channels) product on top of the network. Scores on the logits alone (the maximum
softmax probability; the energy ``-logsumexp(z)``, Liu et al., 2020) cost nothing more, but a CNN's
logits can stay confident far from its data, and they tell less apart: bench/ood.py runs all three
side by side (its figures and the flag's cost are in bench/RESULTS.md). The threshold is the
validation split's score quantile at the configured acceptance rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KNN = "knn"
NEIGHBOURS = 5  # the k of k-NN: one odd near-duplicate in the bank cannot vouch for an image alone
BANK_SIZE = 2048  # training images in the bank at most: a request's cost stays bounded on big datasets


def class_logits(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits, a single-logit binary model's ``z`` as ``(-z/2, z/2)`` (its softmax is the sigmoid)."""
    logits = np.asarray(logits, np.float64)
    return np.concatenate([-logits / 2, logits / 2], axis=1) if logits.shape[1] == 1 else logits


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (N, C) of ``logits / temperature`` (single-logit models included)."""
    z = class_logits(logits) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """The out-of-distribution score per image, ``-logsumexp(logits)``: higher is less familiar."""
    z = class_logits(logits)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_score(features: np.ndarray, bank: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """``1 - cos`` between each row of ``features`` and its ``k``-th nearest row of the normalised
    ``bank``: 0 for an image among the training images, up to 2 for one unlike any of them."""
    similarity = normalise(features) @ np.asarray(bank, np.float32).T
    k = min(k, similarity.shape[1])
    return 1.0 - np.sort(similarity, axis=1)[:, -k]


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, low: float = 0.05, high: float = 20.0
) -> float:
    """The temperature in [low, high] that minimises the negative log-likelihood of ``labels``
    (a bounded search over log T, where the likelihood is unimodal); no images: 1.0."""
    # Here, not at the top: the scoring actor imports this module for Calibration, and scipy.optimize
    # would double its import time.
    from scipy.optimize import minimize_scalar  # noqa: PLC0415 - training only; keeps the scoring actor's start short

    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(low), np.log(high)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(found.x))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Answers grouped by top probability into ``bins`` equal-width bins: each non-empty bin's
    share of answers, mean confidence and accuracy."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return []
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [
        {
            "low": b / bins,
            "high": (b + 1) / bins,
            "share": float((which == b).mean()),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the answer-weighted mean gap between confidence and accuracy over the bins."""
    return float(
        sum(b["share"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, labels, bins))
    )


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance between the probabilities and the one-hot truth (0 is perfect)."""
    probs = np.asarray(probs, np.float64)
    if len(probs) == 0:
        return 0.0
    truth = np.eye(probs.shape[1])[np.asarray(labels, np.int64)]
    return float(((probs - truth) ** 2).sum(axis=1).mean())


def threshold_at(scores: np.ndarray, acceptance: float) -> float:
    """The score below or at which ``acceptance`` of ``scores`` (in-distribution images) fall."""
    scores = np.asarray(scores, np.float64)
    return float(np.quantile(scores, acceptance, method="higher")) if len(scores) else float("inf")


@dataclass(frozen=True)
class Calibration:
    """What a trained model carries to every runtime: its temperature and its OOD threshold."""

    temperature: float = 1.0
    ood_threshold: float = float("inf")
    acceptance: float = 0.95
    neighbours: int = NEIGHBOURS
    method: str = KNN

    def meta(self) -> dict[str, Any]:
        """The model spec's entries (bundle meta, ONNX graph, pyfunc)."""
        return {
            "temperature": self.temperature,
            "ood": {
                "method": self.method,
                "neighbours": self.neighbours,
                "threshold": self.ood_threshold,
                "acceptance": self.acceptance,
            },
        }

    @classmethod
    def of(cls, meta: dict[str, Any]) -> "Calibration":
        """A spec's calibration; a model trained before calibration existed: T = 1, nothing flagged."""
        ood = meta.get("ood") or {}
        return cls(
            temperature=float(meta.get("temperature", 1.0)),
            ood_threshold=float(ood.get("threshold", float("inf"))),
            acceptance=float(ood.get("acceptance", 1.0)),
            neighbours=int(ood.get("neighbours", NEIGHBOURS)),
            method=str(ood.get("method", KNN)),
        )

    def in_distribution(self, scores: np.ndarray | float) -> np.ndarray:
        """Whether each score is within the threshold; a NaN score (a graph exported before the
        score existed, or an image that failed) is never flagged."""
        return ~(np.asarray(scores, np.float64) > self.ood_threshold)


def calibrate(
    logits: np.ndarray, labels: np.ndarray, features: np.ndarray, bank: np.ndarray, acceptance: float
) -> Calibration:
    """Fit the temperature on validation logits and labels, and the OOD threshold on the validation
    images' features against the training ``bank``."""
    return Calibration(
        temperature=fit_temperature(logits, labels),
        ood_threshold=threshold_at(knn_score(features, bank), acceptance),
        acceptance=acceptance,
    )


def uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before scaling, from the calibrated ones: softmax(T * log p) = softmax(z)."""
    return softmax(temperature * np.log(np.clip(np.asarray(probs, np.float64), 1e-30, None)))


def calibration_report(
    probs: np.ndarray, labels: np.ndarray, calibration: Calibration, ood_scores: np.ndarray
) -> dict[str, float]:
    """ECE and Brier of calibrated ``probs`` and of the same answers before scaling, the temperature,
    and the share of images the OOD threshold accepts (NaN scores: a model without the score)."""
    raw = uncalibrated(probs, calibration.temperature)
    scores = np.asarray(ood_scores, np.float64)
    return {
        "ece_uncalibrated": expected_calibration_error(raw, labels),
        "ece": expected_calibration_error(probs, labels),
        "brier_uncalibrated": brier_score(raw, labels),
        "brier": brier_score(probs, labels),
        "temperature": calibration.temperature,
        "in_distribution_rate": float(np.mean(calibration.in_distribution(scores))) if len(scores) else 1.0,
    }
