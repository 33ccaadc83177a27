"""Answers that know when they don't know, for real: the digits sample trained by the job (with its
calibration, OOD bank and threshold), then scikit-learn's pagoda photo (``china.jpg``) flagged by
every runtime a user meets: the predictor, MLflow's pyfunc model, a nightly scoring row, ``/predict``
on Ray Serve (with the prediction log and the metric) and the web page in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import requests

from hotdog_ray import predlog, registry
from hotdog_ray.predict import Predictor
from tests.conftest import Digits
from tests.helpers import browser_session, serve_app, total, wait_until


def test_training_calibrates_keeps_every_answer_and_stores_the_threshold(digits):
    run = registry.client(digits.cfg.tracking).get_run(digits.outcome.run_id)
    metrics = run.data.metrics
    assert metrics["temperature"] > 0 and "ood_threshold" in metrics
    assert metrics["test_ece"] <= metrics["test_ece_uncalibrated"]
    artifacts = {
        a.path for a in registry.client(digits.cfg.tracking).list_artifacts(run.info.run_id, "evaluation")
    }
    assert "evaluation/reliability.png" in artifacts
    meta = digits.predictor.bundle.meta
    assert meta["temperature"] == pytest.approx(metrics["temperature"])
    assert meta["ood"]["acceptance"] == 0.95 and meta["ood"]["threshold"] == pytest.approx(
        metrics["ood_threshold"]
    )
    bank = digits.predictor.bundle.ood_bank
    assert bank.shape[0] <= 2048 and np.linalg.norm(bank, axis=1) == pytest.approx(1, abs=1e-5)
    # temperature scaling keeps the argmax: the served labels are the raw network's
    images = np.stack([digits.predictor.preprocess(f.read_bytes()) for f in digits.test_files])
    served = digits.predictor.predict_arrays(images).probabilities.argmax(axis=1)
    raw = Predictor(load_bundle_without_calibration(digits), device="cpu", runtime="torch")
    assert (raw.predict_arrays(images).probabilities.argmax(axis=1) == served).all()
    assert metrics["test_accuracy"] == pytest.approx(
        np.mean([digits.predictor.classes[i] == f.parent.name for i, f in zip(served, digits.test_files)])
    )


def load_bundle_without_calibration(digits: Digits):
    from hotdog_ray.bundle import ModelBundle

    bundle = digits.predictor.bundle
    return ModelBundle(
        bundle.model, {k: v for k, v in bundle.meta.items() if k not in ("temperature", "ood")}
    )


def test_the_pagoda_is_flagged_and_the_test_digits_are_not(digits):
    answer = digits.predictor.predict(digits.pagoda)
    assert answer.in_distribution is False and answer.ood_score > digits.predictor.calibration.ood_threshold
    accepted = [digits.predictor.predict(f.read_bytes()).in_distribution for f in digits.test_files]
    assert np.mean(accepted) >= 0.85  # the threshold accepts 95% of the validation split
    # both runtimes compute the same score: the ONNX graph holds the bank and the threshold's inputs
    torch_runtime = Predictor(digits.predictor.bundle, device="cpu", runtime="torch")
    images = np.stack(
        [digits.predictor.preprocess(x) for x in (digits.pagoda, digits.test_files[0].read_bytes())]
    )
    assert digits.predictor.runtime == "onnxruntime"
    assert digits.predictor.predict_arrays(images).ood_score == pytest.approx(
        torch_runtime.predict_arrays(images).ood_score, abs=1e-4
    )


def test_mlflow_pyfunc_model_flags_the_pagoda(digits):
    mlflow.set_tracking_uri(registry.tracking_uri(digits.cfg.tracking))
    try:
        model = mlflow.pyfunc.load_model(f"models:/{digits.cfg.tracking.registered_model}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    digit = next(f for f in digits.test_files if digits.predictor.predict(f.read_bytes()).in_distribution)
    out = model.predict(pd.DataFrame({"image": [digits.pagoda, digit.read_bytes()]}))
    assert out["in_distribution"].tolist() == [False, True]
    assert out["ood_score"].iloc[0] > out["ood_score"].iloc[1]


def test_a_scoring_row_flags_the_pagoda(digits, tmp_path):
    from hotdog_ray.score import score

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "china.jpg").write_bytes(digits.pagoda)
    for f in digits.test_files[:5]:
        (incoming / f.name).write_bytes(f.read_bytes())
    (incoming / "broken.jpg").write_bytes(b"")
    score(digits.cfg, input=str(incoming), output=str(tmp_path / "scores"), date="2026-12-07")
    rows = {
        Path(r["path"]).name: r
        for r in pads.dataset(str(tmp_path / "scores" / "date=2026-12-07")).to_table().to_pylist()
    }
    assert rows["china.jpg"]["in_distribution"] is False and rows["china.jpg"]["ood_score"] > 0
    for f in digits.test_files[:5]:
        want = digits.predictor.predict(f.read_bytes())
        assert rows[f.name]["in_distribution"] is want.in_distribution
        assert rows[f.name]["ood_score"] == pytest.approx(want.ood_score, abs=1e-5)
    assert rows["broken.jpg"]["in_distribution"] is None and rows["broken.jpg"]["error"]


@pytest.fixture(scope="module")
def served(digits, shared_serve):
    with serve_app(digits.cfg, "ood", shared_serve) as url:
        yield url


def test_predict_flags_the_pagoda_logs_it_and_counts_it(digits, served):
    r = requests.post(
        served + "/predict", data=digits.pagoda, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["in_distribution"] is False and out["ood_score"] > digits.predictor.calibration.ood_threshold
    assert out["label"] in digits.predictor.classes and out["probabilities"]  # still shown underneath
    digit = digits.test_files[0]
    batch = requests.post(
        served + "/predict/batch",
        files=[
            ("files", ("china.jpg", digits.pagoda, "image/jpeg")),
            ("files", (digit.name, digit.read_bytes(), "image/png")),
        ],
        timeout=60,
    ).json()["results"]
    assert batch[0]["in_distribution"] is False
    assert batch[1]["in_distribution"] is digits.predictor.predict(digit.read_bytes()).in_distribution
    schema = requests.get(served + "/openapi.json", timeout=10).json()
    answer = schema["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"ood_score", "in_distribution"} <= set(answer["properties"])
    version = digits.outcome.model_version

    def logged() -> bool:
        table = predlog.read(str(digits.cfg.prediction_log.location))
        return out["request_id"] in table["request_id"].to_pylist()

    wait_until(logged, timeout=30, interval=0.5)
    table = predlog.read(str(digits.cfg.prediction_log.location)).to_pylist()
    (row,) = [r for r in table if r["request_id"] == out["request_id"]]
    assert row["in_distribution"] is False and row["ood_score"] == pytest.approx(out["ood_score"])
    wait_until(
        lambda: total(r"ray_hotdog_out_of_distribution_total\{", version=version) >= 2,
        timeout=60,
        interval=1,
        message=lambda: "no hotdog_out_of_distribution series for the two flagged answers",
    )


def test_the_page_says_the_photo_looks_like_nothing_it_was_trained_on(digits, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "china.jpg"
    photo.write_bytes(digits.pagoda)
    with browser_session(tmp_path) as driver:
        driver.get(served + "/")
        WebDriverWait(driver, 30).until(lambda d: "version" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(driver, 60).until(
            lambda d: (d.find_element(By.ID, "heatmap").get_attribute("src") or "").startswith(
                "data:image/png"
            )
        )
        assert driver.find_element(By.ID, "verdict").text == (
            "This does not look like anything the model was trained on."
        )
        assert driver.find_elements(By.CSS_SELECTOR, "#probs .row")  # the probabilities stay underneath
