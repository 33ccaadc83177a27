"""One predictor for online serving and batch scoring: decode, preprocess, infer, explain.

Preprocessing is the training pipeline's own (:func:`hotdog_ray.images.open_image`, ``resize``
and ``to_model_input``), so a served prediction equals the offline one for the same file.
Bad bytes raise :class:`~hotdog_ray.images.ImageError` with a reason a client can act on.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image

from hotdog_ray.images import MAX_PIXELS, ImageError, open_for_model, resize, to_model_input
from hotdog_ray.models import last_conv_layer, probabilities

if TYPE_CHECKING:
    from hotdog_ray.bundle import ModelBundle
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

__all__ = ["Explanation", "ImageError", "Prediction", "Predictor", "grad_cam", "overlay_png"]


@dataclass
class Prediction:
    """The answer for one image: top class, every class's probability, the top k."""

    label: str
    probability: float
    probabilities: dict[str, float]
    top_k: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "top_k": self.top_k,
        }


@dataclass
class Explanation:
    prediction: Prediction
    heatmap: np.ndarray = field(repr=False)  # H x W in [0, 1], at the model's input size
    overlay_png: bytes = field(repr=False)  # the heatmap over the photo


def prediction_from(probs: np.ndarray, classes: Sequence[str], k: int) -> Prediction:
    """A :class:`Prediction` from one row of class probabilities (pure)."""
    order = np.argsort(-probs, kind="stable")
    best = int(order[0])
    return Prediction(
        label=classes[best],
        probability=float(probs[best]),
        probabilities={c: float(p) for c, p in zip(classes, probs)},
        top_k=[{"label": classes[i], "probability": float(probs[i])} for i in order[:k]],
    )


class Predictor:
    """A loaded model and the exact preprocessing it was trained with."""

    def __init__(
        self,
        bundle: "ModelBundle",
        *,
        device: str | torch.device | None = None,
        max_pixels: int = MAX_PIXELS,
        min_side: int = 8,
        top_k: int = 5,
    ) -> None:
        self.bundle = bundle
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = bundle.model.to(self.device).eval()
        self.max_pixels, self.min_side, self.top_k = max_pixels, min_side, top_k

    @classmethod
    def from_config(cls, cfg: "Config", ref: str | None = None, **kwargs: Any) -> "Predictor":
        """Load ``ref`` (default ``serve.model_uri``, else the registry's alias or newest version)."""
        from hotdog_ray import registry

        ref = ref or cfg.serve.model_uri or registry.default_model_ref(cfg.tracking)
        log.info("loading model %s", ref)
        predictor = cls(registry.load_model(cfg.tracking, ref), **kwargs)
        predictor.bundle.meta.setdefault("ref", ref)
        return predictor

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def image_size(self) -> int:
        return int(self.bundle.meta["image_size"])

    @property
    def info(self) -> dict[str, Any]:
        """Name, version, classes and input of the model (what ``GET /model`` shows)."""
        meta = self.bundle.meta
        return {
            "name": meta.get("registered_model", meta["name"]),
            "version": meta.get("version"),
            "architecture": meta["name"],
            "ref": meta.get("ref"),
            "run_id": meta.get("run_id"),
            "classes": self.classes,
            "image_size": self.image_size,
            "rescale": meta["rescale"],
        }

    def open(self, data: bytes, *, draft: bool = True) -> Image.Image:
        """Decode to an upright RGB image, or raise :class:`ImageError` (empty, not an image, truncated,
        too large, too small). ``draft`` lets JPEGs decode at reduced size, as training does."""
        return open_for_model(
            data, self.image_size, max_pixels=self.max_pixels, min_side=self.min_side, draft=draft
        )

    def preprocess(self, data: bytes) -> np.ndarray:
        """Bytes to the model's HWC uint8 input, exactly as training decodes them."""
        return resize(self.open(data), self.image_size)

    @torch.inference_mode()
    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for a uint8 NHWC batch."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        # np.require copies only what PIL left read-only (torch wants writable memory)
        x = to_model_input(
            torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device),
            self.bundle.meta["rescale"],
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        return probabilities(logits).cpu().numpy()

    def predict(self, data: bytes) -> Prediction:
        """One image's prediction; raises :class:`ImageError` on bad bytes."""
        return self.predictions(self.predict_arrays(self.preprocess(data)[None]))[0]

    def predictions(self, probs: np.ndarray) -> list[Prediction]:
        return [prediction_from(row, self.classes, self.top_k) for row in probs]

    def explain(self, data: bytes, *, display_size: int = 384) -> Explanation:
        """The prediction and a Grad-CAM heatmap of the top class over the photo."""
        arr = self.preprocess(data)  # the pixels predict() sees
        img = self.open(data, draft=False)  # the photo at full size, to draw on
        prediction = self.predict_arrays(arr[None])[0]
        target = int(np.argmax(prediction))
        x = to_model_input(
            torch.from_numpy(np.require(arr[None], requirements=["C", "W"])).to(self.device),
            self.bundle.meta["rescale"],
        )
        heatmap = grad_cam(self.model, x, target)
        scale = display_size / max(img.size)
        shown = (
            img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
            if scale < 1
            else img
        )
        return Explanation(
            self.predictions(prediction[None])[0], heatmap, overlay_png(np.asarray(shown), heatmap)
        )


def grad_cam(model: torch.nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM on the last convolution: where the evidence for class ``target`` lies, H x W in [0, 1].

    For a single-logit binary model class 1 is the logit and class 0 its negation.
    """
    layer = last_conv_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        # An in-place ReLU after the convolution turns this very tensor into its activation, which
        # is the layer output Keras' Grad-CAM uses.
        captured["a"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().float()
            logits = model(x.requires_grad_(True))
            score = logits[0, 0] * (1 if target == 1 else -1) if logits.shape[1] == 1 else logits[0, target]
            a = captured["a"]
            (grad,) = torch.autograd.grad(score, a)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * a).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    top = cam.max()
    cam = cam / top if top > 0 else cam
    return cam.detach().cpu().numpy().astype(np.float32)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """The heatmap in the 'jet' colours over an HWC uint8 image (any size), as PNG bytes."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    cam = (
        np.asarray(
            Image.fromarray((heatmap * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32
        )
        / 255.0
    )
    colours = colormaps["jet"](cam)[..., :3] * 255.0
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    buf = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
