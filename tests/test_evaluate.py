"""Evaluation: the pure metrics, and ``hotdog evaluate`` on registered versions, runs and dataset URIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hotdog_ray.cli import main
from hotdog_ray.data import ImagePipeline, iter_torch_batches
from hotdog_ray.evaluate import (
    compute_metrics,
    format_report,
    misclassified,
    plot_confusion,
    plot_misclassified,
    predict_batches,
)
from tests.helpers import register_model, tiny_model, tiny_model_config
from tests.imagegen import CLASSES


def test_metrics_on_an_imbalanced_split_expose_the_majority_baseline():
    classes = ["hotdog", "not_hotdog"]
    y_true = np.array([1] * 8 + [0] * 2)
    always_majority = np.ones(10, np.int64)
    m = compute_metrics(y_true, always_majority, classes)
    # 80% accuracy by never finding a hotdog: balanced accuracy and macro-F1 say so.
    assert m["accuracy"] == pytest.approx(0.8) == pytest.approx(m["majority_baseline"])
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0 + 2 * 0.8 / 1.8) / 2)
    assert m["majority_class"] == "not_hotdog"
    assert m["confusion_matrix"] == [[0, 2], [0, 8]]
    assert [r["support"] for r in m["per_class"]] == [2, 8]
    assert m["per_class"][0]["recall"] == 0.0 and m["per_class"][1]["recall"] == 1.0

    perfect = compute_metrics(y_true, y_true, classes)
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == perfect["macro_f1"] == 1.0


def test_report_and_confusion_plot_name_every_class():
    m = compute_metrics(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), list(CLASSES))
    report = format_report(m)
    lines = [line.split() for line in report.splitlines()]
    assert ["accuracy", "0.7500"] in lines
    assert ["majority", "baseline", "0.5000", "always", "'hotdog'"] in lines
    # scikit-learn's table: a row per class with its precision, recall, F1 and support
    for name, row in zip(CLASSES, m["per_class"]):
        assert [
            name,
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1']:.3f}",
            str(row["support"]),
        ] in lines
    fig = plot_confusion(m)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == list(CLASSES)


def test_the_misclassified_grid_shows_the_most_confident_mistakes_with_both_labels():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.05, 0.15, 0.8]])
    labels = np.array([0, 0, 2, 0])  # rows 1 and 3 wrong, row 3 the more confident
    wrong = misclassified(probs, labels)
    assert wrong.tolist() == [3, 1] and misclassified(probs, labels, most=1).tolist() == [3]
    images = np.zeros((2, 8, 8, 3), np.uint8)
    fig = plot_misclassified(images, labels[wrong], probs[wrong], list(CLASSES))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [
        f"true {CLASSES[0]}\npredicted {CLASSES[2]} (80%)",
        f"true {CLASSES[0]}\npredicted {CLASSES[1]} (70%)",
    ]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, image_tree):
    """An untrained first_cnn logged and registered as version 1 (evaluation does not care how good it is)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_model_config(tmp, f"data.root={image_tree.root}")
    model = tiny_model(CLASSES)
    run_id, version = register_model(cfg, model, CLASSES, name="for-evaluate")
    return cfg, model, run_id, version


def _expected(cfg, model, split: str = "test") -> dict:
    y, p = predict_batches(
        model,
        iter_torch_batches(
            ImagePipeline.from_config(cfg.data).dataset(split), batch_size=64, rescale=cfg.data.rescale
        ),
    )
    return compute_metrics(y, p.argmax(axis=1), list(CLASSES))


def test_evaluate_a_registered_version_and_a_run_gives_the_models_own_metrics(
    ray_session, registered, image_tree, capsys
):
    cfg, model, run_id, version = registered
    uri = ["--set", f"tracking.uri={cfg.tracking.uri}"]
    expected = _expected(cfg, model)
    assert expected["num_images"] == sum(image_tree.good["test"].values())

    for ref in (None, f"models:/{cfg.tracking.registered_model}/{version}", f"runs:/{run_id}"):
        args = ["evaluate", *uri, "--data", str(cfg.data.root), "--json"] + (["--model", ref] if ref else [])
        assert main(args) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["confusion_matrix"] == expected["confusion_matrix"], ref
        assert got["accuracy"] == pytest.approx(expected["accuracy"])


def test_evaluate_reads_a_dataset_from_s3(ray_session, registered, s3, capsys):
    cfg, model, _, _ = registered
    bucket = s3.bucket("evaluate")
    root = s3.upload_dir(Path(cfg.data.root), bucket, "data")
    assert (
        main(
            [
                "evaluate",
                "--set",
                f"tracking.uri={cfg.tracking.uri}",
                "--data",
                root,
                "--split",
                "validation",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert got["confusion_matrix"] == _expected(cfg, model, "validation")["confusion_matrix"]


def test_evaluate_an_unknown_model_is_a_one_line_error(registered, capsys):
    cfg, *_ = registered
    assert main(["evaluate", "--set", f"tracking.uri={cfg.tracking.uri}", "--model", "models:/nope/3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "models:/nope/3" in err and len(err.splitlines()) == 1
