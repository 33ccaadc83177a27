"""Honest evaluation: accuracy beside balanced accuracy, macro-F1 and the majority-class baseline,
a per-class table and a confusion matrix. The metric functions are pure; plotting is separate."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from hotdog_ray import cache, confidence
from hotdog_ray.data import ImagePipeline, discover
from hotdog_ray.models import logits_and_features, probabilities
from hotdog_ray.predict import Predictor, Scores
from hotdog_ray.runtime import init_ray
from hotdog_ray.tables import render

if TYPE_CHECKING:
    from hotdog_ray.bundle import ModelBundle
    from hotdog_ray.cache import CachedSplit
    from hotdog_ray.confidence import Calibration
    from hotdog_ray.config import Config
    from hotdog_ray.predict import Predictor

log = logging.getLogger(__name__)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Test-split metrics; ``majority_baseline`` is what always answering the commonest class scores."""

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = list(range(len(classes)))
    counts = np.bincount(y_true, minlength=len(classes))
    # The numbers and the printed table from the same arguments, so they never disagree.
    report = dict(labels=labels, target_names=list(classes), zero_division=0, digits=3)
    per_class = classification_report(y_true, y_pred, output_dict=True, **report)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "majority_baseline": float(counts.max() / max(1, counts.sum())),
        "majority_class": classes[int(counts.argmax())],
        "num_images": int(len(y_true)),
        "per_class": [
            {
                "class": c,
                "precision": float(per_class[c]["precision"]),
                "recall": float(per_class[c]["recall"]),
                "f1": float(per_class[c]["f1-score"]),
                "support": int(per_class[c]["support"]),
            }
            for c in classes
        ],
        "classification_report": classification_report(y_true, y_pred, **report),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def format_report(m: dict[str, Any]) -> str:
    """The metrics as the recipes print them after training: the headline figures, scikit-learn's
    classification report, and calibration before and after temperature scaling."""
    headline = [
        ["test images", m["num_images"], ""],
        ["accuracy", f"{m['accuracy']:.4f}", ""],
        ["balanced accuracy", f"{m['balanced_accuracy']:.4f}", ""],
        ["macro F1", f"{m['macro_f1']:.4f}", ""],
        ["majority baseline", f"{m['majority_baseline']:.4f}", f"always '{m['majority_class']}'"],
    ]
    parts = [render(["", "", ""], headline), m["classification_report"].rstrip()]
    if "calibration" in m:
        c = m["calibration"]
        parts.append(
            render(
                ["calibration", "before", "after"],
                [
                    ["ECE", f"{c['ece_uncalibrated']:.4f}", f"{c['ece']:.4f}"],
                    ["Brier score", f"{c['brier_uncalibrated']:.4f}", f"{c['brier']:.4f}"],
                ],
            )
            + f"\ntemperature {c['temperature']:.3f}; in distribution {c['in_distribution_rate']:.4f} "
            "(the share the OOD threshold accepts)"
        )
    return "\n\n".join(parts)


@dataclass
class Outputs:
    """A network's raw outputs over a split: labels, logits and pooled last-convolution features."""

    labels: np.ndarray
    logits: np.ndarray
    features: np.ndarray


@torch.inference_mode()
def outputs_of(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> Outputs:
    """The :class:`Outputs` over (images, labels) batches."""

    model = model.to(device).eval()
    ys, zs, fs = [], [], []
    for x, y in batches:
        logits, features = logits_and_features(model, x.to(device))
        zs.append(logits.float().cpu().numpy())
        fs.append(features.cpu().numpy())
        ys.append(y.cpu().numpy())
    if not ys:
        return Outputs(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32))
    return Outputs(np.concatenate(ys), np.concatenate(zs), np.concatenate(fs))


def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) over (images, labels) batches."""
    out = outputs_of(model, batches, device)
    return out.labels, (
        probabilities(torch.from_numpy(out.logits)).numpy() if len(out.labels) else out.logits
    )


def predict_cached(
    predictor: "Predictor", split: "CachedSplit", batch_size: int = 256
) -> tuple[np.ndarray, Scores]:
    """(labels, scores) over a decoded cache (:mod:`hotdog_ray.cache`), on the predictor's runtime
    (what serving and scoring run)."""
    ys, scores = [], []
    for shard in split.shards:
        images = split.read_images(shard)
        ys.append(split.read_index(shard).column("label").to_numpy())
        scores += [
            predictor.predict_arrays(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
        ]
    if not ys:
        return np.zeros(0, np.int64), Scores.empty(len(predictor.classes))
    return np.concatenate(ys).astype(np.int64), Scores(*(np.concatenate(part) for part in zip(*scores)))


def evaluate_model(
    cfg: "Config", bundle: "ModelBundle", *, root: str | None = None, split: str = "test"
) -> dict[str, Any]:
    """Metrics of a loaded model on ``split`` of ``root`` (default ``data.root``), run on
    ``predict.runtime`` (the images: :func:`cached_split_for`)."""

    predictor = Predictor(bundle, runtime=cfg.predict.runtime)
    y, scores = predict_cached(predictor, cached_split_for(cfg, bundle, root=root, split=split))
    metrics = compute_metrics(y, scores.probabilities.argmax(axis=1), bundle.classes)
    metrics["calibration"] = confidence.calibration_report(
        scores.probabilities, y, predictor.calibration, scores.ood_score
    )
    return metrics


def cached_split_for(
    cfg: "Config", bundle: "ModelBundle", *, root: str | None = None, split: str = "test"
) -> "CachedSplit":
    """``split`` of ``root`` (default ``data.root``) decoded as ``bundle``'s model takes it.

    Images are read at the model's own input size and rescale and labelled with its own class
    list, so models trained at different sizes are compared on the same files. They come from the
    decoded-image cache, built first if there is none (the one training made, when size and classes
    match): comparing a champion with a candidate decodes the split once at most.
    """

    data_cfg = cfg.data.model_copy(
        update={
            "root": root or cfg.data.root,
            "image_size": bundle.meta["image_size"],
            "rescale": bundle.meta["rescale"],
            "classes": bundle.classes,
            "max_classes": None,
        }
    )
    layout = discover(data_cfg, required=(split,))
    init_ray()
    cached, _ = cache.ensure(
        layout, split, data_cfg, cache.cache_root(cfg), lambda: ImagePipeline(data_cfg, layout)
    )
    return cached


def plot_curves(history: list[dict[str, float]]):
    """Training vs validation loss and accuracy per epoch (the recipes' two plots, side by side)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, title in (
        (axes[0], "loss", "Training loss vs. validation loss"),
        (axes[1], "accuracy", "Training accuracy vs. validation accuracy"),
    ):
        ax.plot(epochs, [h[key] for h in history], "b", label=f"training {key}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "r", label=f"validation {key}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def plot_sweep(trials: list[dict[str, Any]]):
    """Validation loss per trial over epochs; trials ASHA stopped are dashed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for t in trials:
        if not t["curve"]:
            continue
        epochs, losses = zip(*t["curve"])
        ax.plot(
            [e + 1 for e in epochs],
            losses,
            "--" if t["status"] != "finished" else "-",
            marker=".",
            label=f"{t['trial_id']} ({t['status']})",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss per trial")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_confusion(m: dict[str, Any]):
    """The confusion matrix with counts in the cells."""
    n = len(m["classes"])
    fig = Figure(figsize=(max(4, 0.6 * n + 2), max(4, 0.6 * n + 2)))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(m["confusion_matrix"]), display_labels=m["classes"]).plot(
        ax=ax, colorbar=False, xticks_rotation=45 if n > 4 else 0
    )
    ax.set_title(f"test accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}")
    fig.tight_layout()
    return fig


def misclassified(probs: np.ndarray, labels: np.ndarray, most: int = 25) -> np.ndarray:
    """Positions of the wrong answers, the most confident first, at most ``most`` (pure)."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    return wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:most]


def plot_misclassified(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, classes: list[str]
) -> Figure:
    """A grid of test images the model got wrong (as the Food-101 recipe ends), each titled with
    its true and predicted class and the confidence of the prediction."""
    n = len(images)
    cols = min(5, max(1, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(2.4 * cols, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, label, p in zip(axes, images, labels, probs):
        guess = int(p.argmax())
        ax.imshow(image.squeeze(), cmap="gray" if image.ndim == 2 or image.shape[-1] == 1 else None)
        ax.set_title(f"true {classes[label]}\npredicted {classes[guess]} ({p[guess]:.0%})", fontsize=8)
    if n == 0:
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.tight_layout()
    return fig


def plot_reliability(logits: np.ndarray, labels: np.ndarray, calibration: "Calibration") -> Figure:
    """Reliability diagram: accuracy against confidence per bin, before and after scaling."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for temperature, style, name in (
        (1.0, "r-o", "uncalibrated"),
        (calibration.temperature, "b-s", "calibrated"),
    ):
        probs = confidence.softmax(logits, temperature)
        rows = confidence.reliability_bins(probs, labels)
        ece = confidence.expected_calibration_error(probs, labels)
        ax.plot(
            [r["confidence"] for r in rows],
            [r["accuracy"] for r in rows],
            style,
            label=f"{name} (T={temperature:.2f}, ECE {ece:.3f})",
        )
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Reliability on the test split")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
