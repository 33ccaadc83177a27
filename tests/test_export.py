"""ONNX export and the MLflow model: every zoo model exports and matches PyTorch, a model that
cannot match ships without ONNX and says so, older versions keep loading (and get ONNX when
registered), and MLflow's own pyfunc loader and ``mlflow models serve`` answer as our predictor."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch

from hotdog_ray import model_store, registry, tracking
from hotdog_ray.bundle import ModelBundle, model_meta, save_bundle
from hotdog_ray.confidence import Calibration, normalise
from hotdog_ray.errors import ModelError
from hotdog_ray.export import TOLERANCE, check_batch, export_onnx, probability_column
from hotdog_ray.models import build_model, last_conv_layer
from hotdog_ray.onnxrt import onnx_session
from hotdog_ray.predict import Predictor, choose_runtime
from hotdog_ray.promote import force
from tests.helpers import free_port, register_model, stop_command, tiny_model, tiny_model_config, wait_http
from tests.imagegen import CLASSES, LEVELS, encode

ZOO_AT_SMALL_SIZES = [
    ("first_cnn", 16),
    ("catdog_cnn", 16),
    ("food_cnn", 96),  # its five poolings need 96 px
    ("snacks_cnn", 16),
    ("resnet18", 32),
    ("vgg16", 32),
]


def meta_for(name: str, size: int, classes: int, rescale: str = "unit") -> dict:
    return {
        "name": name,
        "classes": [f"c{i}" for i in range(classes)],
        "image_size": size,
        "rescale": rescale,
    }


@pytest.mark.parametrize("name,size", ZOO_AT_SMALL_SIZES, ids=[z[0] for z in ZOO_AT_SMALL_SIZES])
def test_every_zoo_model_exports_and_matches_pytorch(name, size):
    torch.manual_seed(0)
    model = build_model(name, 3, size).eval()
    meta = meta_for(name, size, 3, "symmetric") | Calibration(temperature=1.7, ood_threshold=0.2).meta()
    # a bank of the model's own feature width: the graph holds the k-NN score for every architecture
    width = last_conv_layer(model).out_channels
    bank = normalise(np.random.default_rng(0).random((20, width)))
    exported = export_onnx(model, meta, bank)
    assert exported.ok and exported.max_abs_diff <= TOLERANCE, exported.reason
    # Another batch size than the check's (the batch axis is dynamic), compared with the predictor.
    images = check_batch(size, n=7, seed=3)
    got, ood = onnx_session(exported.model).run(None, {"images": images})
    want = Predictor(ModelBundle(model, meta, ood_bank=bank), device="cpu", runtime="torch").predict_arrays(
        images
    )
    assert got.shape == (7, 3) and np.abs(got - want.probabilities).max() <= TOLERANCE
    assert ood.shape == (7,) and np.abs(ood - want.ood_score).max() <= TOLERANCE and np.isfinite(ood).all()


def test_a_single_logit_model_gives_both_classes():
    model = build_model("first_cnn", 2, 16).eval()
    exported = export_onnx(model, meta_for("first_cnn", 16, 2))
    probs = onnx_session(exported.model).run(None, {"images": check_batch(16, 5)})[0]
    assert probs.shape == (5, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-6)


def diverged(model: torch.nn.Module) -> torch.nn.Module:
    """A model whose training diverged: NaN weights, which no runtime can be checked against."""
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


def test_a_model_that_cannot_match_is_registered_without_onnx_and_tagged(tmp_path):
    cfg = tiny_model_config(tmp_path)
    run_id, version = register_model(cfg, diverged(tiny_model(CLASSES)), CLASSES)
    client = registry.client(cfg.tracking)
    tag = client.get_model_version(cfg.tracking.registered_model, version).tags["onnx"]
    assert tag.startswith("failed: ONNX Runtime differs from PyTorch")
    assert client.get_run(run_id).data.tags["onnx"] == tag
    bundle = model_store.load_model(cfg.tracking, f"models:/{cfg.tracking.registered_model}/{version}")
    assert bundle.onnx is None
    assert Predictor(bundle, device="cpu").runtime == "torch"  # auto falls back
    with pytest.raises(ModelError, match="no ONNX graph"):
        Predictor(bundle, device="cpu", runtime="onnxruntime")


def test_choose_runtime():
    assert choose_runtime("auto", "cpu", True) == "onnxruntime"
    assert choose_runtime("auto", "cpu", False) == "torch"
    assert choose_runtime("auto", "cuda", True) == "measure"
    assert choose_runtime("torch", "cpu", True) == "torch"
    assert choose_runtime("onnxruntime", "cuda", True) == "onnxruntime"
    with pytest.raises(ModelError):
        choose_runtime("onnxruntime", "cpu", False)


def test_a_version_registered_before_export_loads_and_gets_onnx_when_promoted(tmp_path):
    """The old layout (weights.pt and model.json at the top of model/, no MLmodel) still loads;
    forcing it to champion, or registering its run again (a promotion), exports it first."""
    cfg = tiny_model_config(tmp_path)
    model, meta = tiny_model(CLASSES, seed=2), model_meta(cfg, list(CLASSES))
    client = registry.client(cfg.tracking)
    with tracking.run(cfg.tracking, name="before-onnx") as run:
        save_bundle(tmp_path / "old", model, meta)
        client.log_artifacts(run.id, str(tmp_path / "old"), "model")
    client.create_registered_model(cfg.tracking.registered_model)
    source = f"{client.get_run(run.id).info.artifact_uri}/model"
    old = client.create_model_version(cfg.tracking.registered_model, source, run_id=run.id).version
    name = cfg.tracking.registered_model
    bundle = model_store.load_model(cfg.tracking, f"models:/{name}/{old}")
    assert bundle.onnx is None and bundle.meta["image_size"] == 16

    data = encode(LEVELS["cat"], "RGB", "JPEG", (24, 20))
    expected = Predictor(ModelBundle(model, meta), device="cpu", runtime="torch").predict(data).probabilities
    force(cfg, old)
    assert client.get_model_version(name, old).tags["onnx"] == "exported"
    upgraded = model_store.load_model(cfg.tracking, f"models:/{name}@{cfg.tracking.alias}")
    assert upgraded.onnx is not None
    new = model_store.register(cfg.tracking, run.id)  # already exported: the tag carries over
    assert client.get_model_version(name, new).tags["onnx"] == "exported"
    served = Predictor(upgraded, device="cpu")
    assert served.runtime == "onnxruntime"
    assert served.predict(data).probabilities == pytest.approx(expected, abs=TOLERANCE)


def test_promote_sets_and_clears_the_challenger_alias(tmp_path, capsys):
    from hotdog_ray.cli import main

    cfg = tiny_model_config(tmp_path)
    _, version = register_model(cfg, tiny_model(CLASSES), CLASSES)
    store = ["--set", f"tracking.uri={cfg.tracking.uri}"]
    assert main(["promote", "--challenger", version, *store]) == 0
    assert registry.alias_version(cfg.tracking, "challenger") == version
    assert registry.alias_version(cfg.tracking) is None  # the champion alias is untouched
    assert main(["promote", "--clear-challenger", *store]) == 0
    assert registry.alias_version(cfg.tracking, "challenger") is None
    assert "challenger removed" in capsys.readouterr().out


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A registered version with the champion alias: (cfg, our predictor of it, images)."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    cfg = tiny_model_config(tmp)
    _, version = register_model(cfg, tiny_model(CLASSES, seed=4), CLASSES)
    registry.set_alias(cfg.tracking, version)
    ours = Predictor.from_config(cfg, device="cpu")
    images = [encode(LEVELS[c], "RGB", "JPEG", (30, 20), seed=i) for i, c in enumerate(CLASSES)]
    return cfg, ours, images


def expected_frame(predictor: Predictor, images: list[bytes]) -> pd.DataFrame:
    preds = [predictor.predict(x) for x in images]
    return pd.DataFrame(
        {
            "label": [p.label for p in preds],
            "probability": [p.probability for p in preds],
            **{probability_column(c): [p.probabilities[c] for p in preds] for c in predictor.classes},
            "ood_score": [np.nan if p.ood_score is None else p.ood_score for p in preds],
            "in_distribution": [p.in_distribution for p in preds],
        }
    )


def test_mlflow_pyfunc_load_model_predicts_what_our_predictor_predicts(champion):
    cfg, ours, images = champion
    mlflow.set_tracking_uri(registry.tracking_uri(cfg.tracking))
    try:
        model = mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registered_model}@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.metadata.signature.inputs.input_names() == ["image"]
    out = model.predict(pd.DataFrame({"image": images + [b"not an image"]}))
    pd.testing.assert_frame_equal(out.iloc[:-1, :-1], expected_frame(ours, images), atol=1e-5)
    assert out["label"].iloc[-1] == "" and "not a readable image" in out["error"].iloc[-1]


def test_mlflow_models_serve_answers_a_post_on_loopback(champion, tmp_path):
    cfg, ours, images = champion
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # MLflow runs `uvicorn` from PATH, as in an active venv
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry.tracking_uri(cfg.tracking),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    mlflow_cli = str(Path(bin_dir) / "mlflow")
    proc = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/{cfg.tracking.registered_model}@champion"]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=open(tmp_path / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=90, proc=proc)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(x).decode()] for x in images],
            }
        }
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = pd.DataFrame(r.json()["predictions"])
        pd.testing.assert_frame_equal(got, expected_frame(ours, images), atol=1e-5)
        os.killpg(proc.pid, signal.SIGTERM)  # what a process manager sends
        proc.wait(timeout=30)
    finally:
        stop_command(proc)
