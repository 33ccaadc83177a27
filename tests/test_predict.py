"""The shared predictor: the training pipeline's pixels, every bad input refused with a reason,
odd image modes accepted, and Grad-CAM that points where the evidence is."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hotdog_ray.bundle import ModelBundle, model_meta
from hotdog_ray.confidence import Calibration
from hotdog_ray.config import load_config
from hotdog_ray.errors import ImageError
from hotdog_ray.models import build_model
from hotdog_ray.predict import Predictor, Scores, grad_cam, overlay_png, prediction_from
from tests.helpers import png, png_header_claiming
from tests.imagegen import CLASSES, LEVELS, encode, truncated_jpeg


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    cfg = load_config(None, ["data.image_size=16", "model.name=first_cnn", "model.filters=4"])
    torch.manual_seed(0)
    model = build_model("first_cnn", len(CLASSES), 16, filters=4).eval()
    return Predictor(ModelBundle(model, model_meta(cfg, list(CLASSES))), device="cpu")


def test_served_predictions_equal_the_offline_pipeline(ray_session, image_tree, predictor):
    """Every test file through the predictor gives the probabilities the Ray Data pipeline +
    model give for the same file (what evaluation and training see)."""
    from hotdog_ray.data import ImagePipeline
    from hotdog_ray.evaluate import predict_batches

    cfg = load_config(None, [f"data.root={image_tree.root}", "data.image_size=16"])
    pipeline = ImagePipeline.from_config(cfg.data, required=("test",))
    rows = pipeline.dataset("test", keep_paths=True).take_all()
    assert len(rows) == image_tree.good_count("test")
    images = np.stack([r["image"] for r in rows])
    _, offline = predict_batches(
        predictor.model,
        [
            (
                torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
                torch.zeros(len(rows), dtype=torch.long),
            )
        ],
    )
    for row, expected in zip(rows, offline):
        data = Path(row["path"] if Path(row["path"]).exists() else "/" + row["path"]).read_bytes()
        np.testing.assert_array_equal(predictor.preprocess(data), row["image"])
        got = predictor.predict(data)
        np.testing.assert_allclose([got.probabilities[c] for c in CLASSES], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"just some text, not a photo\n" * 3, "not a readable image"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "not a readable image"),
        (truncated_jpeg(), "not a readable image|corrupt image data"),
        (png(np.zeros((1, 1, 3), np.uint8)), "too small: 1x1"),
        (png_header_claiming(60_000, 60_000), "too large"),
    ],
    ids=["empty", "text", "pdf", "truncated-jpeg", "1x1", "bomb"],
)
def test_bad_input_is_refused_with_a_reason(predictor, data, reason):
    with pytest.raises(ImageError, match=reason):
        predictor.predict(data)


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB-exif", "JPEG")],
)
def test_odd_modes_are_converted_to_the_right_pixels(predictor, mode, fmt):
    """Grayscale, RGBA, palette, CMYK, 16-bit and EXIF-rotated inputs decode to the class's gray level."""
    arr = predictor.preprocess(encode(LEVELS["dog"], mode, fmt, (36, 18)))
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert abs(float(arr.mean()) - LEVELS["dog"]) < 6


def test_exif_rotation_is_applied():
    """A landscape JPEG tagged 'rotate 90' comes out portrait, as a phone shows it."""
    cfg = load_config(None, ["data.image_size=16"])
    p = Predictor(ModelBundle(nn.Identity(), model_meta(cfg, ["a", "b"])), device="cpu")
    assert p.open(encode(100, "RGB-exif", "JPEG", (36, 18))).size == (18, 36)
    assert p.open(encode(100, "RGB", "JPEG", (36, 18))).size == (36, 18)


def test_a_batch_keeps_order_and_gives_one_error_per_bad_image(predictor):
    good = encode(LEVELS["cat"], "RGB", "JPEG", (30, 30))
    out = predictor.predict_many([good, b"", good, b"nope"])
    assert [type(o).__name__ for o in out] == ["Scores", "ImageError", "Scores", "ImageError"]
    expected = list(predictor.predict(good).probabilities.values())
    assert out[0].probabilities.tolist() == out[2].probabilities.tolist() == pytest.approx(expected)
    # a model saved without an OOD bank has no score, and is never flagged
    assert np.isnan(out[0].ood_score) and predictor.predict(good).ood_score is None
    assert predictor.predict_many([b""])[0].args[0] == "empty file"


def test_prediction_lists_every_class_and_the_top_k():
    p = prediction_from(Scores(np.array([0.1, 0.7, 0.2], np.float32), -3.0), ["a", "b", "c"], k=2)
    assert (p.label, p.probability) == ("b", pytest.approx(0.7))
    assert [t["label"] for t in p.top_k] == ["b", "c"]
    assert sum(p.probabilities.values()) == pytest.approx(1.0)
    assert (p.ood_score, p.in_distribution) == (-3.0, True)  # no threshold: nothing is flagged


def test_a_score_past_the_threshold_flags_the_answer_and_a_missing_score_never_does():
    calibration = Calibration(temperature=1.5, ood_threshold=-2.0)
    probs = np.array([0.2, 0.8], np.float32)
    assert prediction_from(Scores(probs, -2.5), ["a", "b"], 1, calibration).in_distribution is True
    assert prediction_from(Scores(probs, -2.0), ["a", "b"], 1, calibration).in_distribution is True
    far = prediction_from(Scores(probs, -1.0), ["a", "b"], 1, calibration)
    assert (far.in_distribution, far.label, far.ood_score) == (False, "b", -1.0)  # the label stays
    old = prediction_from(
        Scores(probs, float("nan")), ["a", "b"], 1, calibration
    )  # exported before the score
    assert (old.ood_score, old.in_distribution) == (None, True)


def _brightness_model(single_logit: bool) -> nn.Module:
    """Class 1's score is the mean brightness after a 1x1 convolution and ReLU: its evidence is
    exactly the bright pixels, so Grad-CAM must light them up (and nothing for class 0)."""
    conv = nn.Conv2d(3, 1, 1)
    head = nn.Linear(1, 1 if single_logit else 2)
    with torch.no_grad():
        conv.weight.fill_(1 / 3)
        conv.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0]]) if single_logit else torch.tensor([[-1.0], [1.0]]))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


@pytest.mark.parametrize("single_logit", [False, True])
def test_grad_cam_points_at_the_evidence(single_logit):
    x = torch.zeros(1, 3, 16, 16)
    x[:, :, 2:6, 10:14] = 1.0  # a bright patch, top right
    model = _brightness_model(single_logit)
    cam = grad_cam(model, x, target=1)
    assert cam.shape == (16, 16) and cam.max() == pytest.approx(1.0) and cam.min() >= 0
    assert cam[2:6, 10:14].mean() > 0.9 and cam[10:, :6].max() < 0.05
    assert grad_cam(model, x, target=0).max() == 0  # the patch is evidence against class 0


def test_explain_returns_the_prediction_and_a_png_overlay(predictor):
    data = encode(LEVELS["hotdog"], "RGB", "JPEG", (48, 32))
    ex = predictor.explain(data)
    assert ex.prediction.probabilities == pytest.approx(predictor.predict(data).probabilities, rel=1e-5)
    assert ex.heatmap.shape == (16, 16) and 0 <= ex.heatmap.min() and ex.heatmap.max() <= 1
    overlay = Image.open(io.BytesIO(ex.overlay_png))
    assert overlay.format == "PNG" and overlay.size == (48, 32)  # the photo's own size (under 384 px)
    big = predictor.explain(encode(LEVELS["hotdog"], "RGB", "JPEG", (800, 400)))
    assert Image.open(io.BytesIO(big.overlay_png)).size == (384, 192)


def test_overlay_colours_the_hot_region():
    image = np.full((20, 20, 3), 128, np.uint8)
    heat = np.zeros((10, 10), np.float32)
    heat[:5, :5] = 1.0
    out = np.asarray(Image.open(io.BytesIO(overlay_png(image, heat))))
    # 'jet' is dark red at 1 and dark blue at 0
    assert out[2, 2, 0] > out[2, 2, 2] and out[17, 17, 2] > out[17, 17, 0]
