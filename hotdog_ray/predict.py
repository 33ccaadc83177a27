"""One predictor for online serving and batch scoring: decode, preprocess, infer, explain.

Preprocessing is the training pipeline's own (:func:`hotdog_ray.images.open_image`, ``resize``
and ``to_model_input``), so a served prediction equals the offline one for the same file.
Bad bytes raise :class:`~hotdog_ray.images.ImageError` with a reason a client can act on.

The forward pass runs in one of two runtimes (``predict.runtime``): ONNX Runtime on the model's
verified ONNX graph (1.1-2.1x faster than eager PyTorch for the zoo's CNNs on one CPU thread, see
``bench/infer.py``) or PyTorch, which Grad-CAM (:meth:`Predictor.explain`) always uses.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from matplotlib import colormaps
from PIL import Image

from hotdog_ray import model_store, registry
from hotdog_ray.confidence import Calibration
from hotdog_ray.errors import ModelError
from hotdog_ray.export import InferenceGraph, check_batch
from hotdog_ray.images import MAX_PIXELS, ImageError, decode_rows, open_for_model, resize, to_model_input
from hotdog_ray.models import last_conv_layer
from hotdog_ray.onnxrt import Scores, onnx_session, run_onnx

if TYPE_CHECKING:
    from hotdog_ray.bundle import ModelBundle
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "Explanation",
    "ImageError",
    "Prediction",
    "Predictor",
    "Scores",
    "choose_runtime",
    "cpu_threads",
    "grad_cam",
    "overlay_png",
]

ONNXRUNTIME, TORCH = "onnxruntime", "torch"
GPU_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass
class Prediction:
    """The answer for one image: top class, every class's calibrated probability, the top k, and
    whether the image looks like anything the model was trained on (:mod:`hotdog_ray.confidence`)."""

    label: str
    probability: float
    probabilities: dict[str, float]
    top_k: list[dict[str, Any]]
    ood_score: float | None = None  # None: a model exported before the score existed
    in_distribution: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "top_k": self.top_k,
            "ood_score": self.ood_score,
            "in_distribution": self.in_distribution,
        }


@dataclass
class Explanation:
    prediction: Prediction
    heatmap: np.ndarray = field(repr=False)  # H x W in [0, 1], at the model's input size
    overlay_png: bytes = field(repr=False)  # the heatmap over the photo


def prediction_from(
    scores: Scores, classes: Sequence[str], k: int, calibration: Calibration = Calibration()
) -> Prediction:
    """A :class:`Prediction` from one image's :class:`Scores` (pure)."""
    probs, ood = scores
    order = np.argsort(-probs, kind="stable")
    best = int(order[0])
    known = bool(np.isfinite(ood))
    return Prediction(
        label=classes[best],
        probability=float(probs[best]),
        probabilities={c: float(p) for c, p in zip(classes, probs)},
        top_k=[{"label": classes[i], "probability": float(probs[i])} for i in order[:k]],
        ood_score=float(ood) if known else None,
        in_distribution=bool(calibration.in_distribution(ood)),
    )


def cpu_threads(cpus: float) -> int:
    """Forward-pass threads for a Ray reservation of ``cpus``: at least one, never more than reserved."""
    return max(1, int(cpus))


def choose_runtime(requested: str, device_type: str, has_onnx: bool) -> str:
    """The runtime to use: ``onnxruntime``, ``torch``, or ``measure`` (time both on the GPU).

    ``auto`` takes ONNX Runtime on the CPU whenever the model has its ONNX graph; asking for
    ``onnxruntime`` on a model without one is an error, not a silent fallback.
    """
    if requested == TORCH:
        return TORCH
    if requested == ONNXRUNTIME:
        if not has_onnx:
            raise ModelError(
                "predict.runtime is onnxruntime but this model has no ONNX graph (registered before "
                "export existed, or its export failed: see the version's onnx tag); use auto or torch"
            )
        return ONNXRUNTIME
    if requested != "auto":
        raise ValueError(f"unknown runtime {requested!r} (expected auto, onnxruntime or torch)")
    if not has_onnx:
        return TORCH
    return ONNXRUNTIME if device_type == "cpu" else "measure"


class Predictor:
    """A loaded model and the exact preprocessing it was trained with."""

    def __init__(
        self,
        bundle: "ModelBundle",
        *,
        device: str | torch.device | None = None,
        runtime: str = "auto",
        threads: int | None = None,
        max_pixels: int = MAX_PIXELS,
        min_side: int = 8,
        top_k: int = 5,
    ) -> None:
        """``threads`` caps ONNX Runtime's threads (a Serve replica's or scoring actor's CPU
        reservation; None: one per core). PyTorch is left alone: in a Ray worker it already follows
        OMP_NUM_THREADS, which Ray sets from the same reservation, and setting it here would change
        the whole process's PyTorch (a driver's, a notebook's)."""
        self.bundle = bundle
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = bundle.model.to(self.device).eval()
        self.max_pixels, self.min_side, self.top_k = max_pixels, min_side, top_k
        self.calibration = Calibration.of(bundle.meta)
        # The PyTorch runtime runs what the ONNX graph holds: the same calibration and OOD score.
        self.graph = InferenceGraph(self.model, bundle.meta["rescale"], self.calibration, bundle.ood_bank)
        self.graph.to(self.device).eval()
        self.session = None
        self.runtime = choose_runtime(runtime, self.device.type, bundle.onnx is not None)
        if self.runtime == "measure":
            self.runtime = self._faster_on_gpu()
        if self.runtime == ONNXRUNTIME and self.session is None:
            self.session = self._session(threads)
        log.info("%s runs on %s (%s)", bundle.meta["name"], self.runtime, self.device)

    def _session(self, threads: int | None = None):

        providers = GPU_PROVIDERS if self.device.type == "cuda" else ("CPUExecutionProvider",)
        return onnx_session(self.bundle.onnx, threads=threads, providers=providers)

    def _faster_on_gpu(self) -> str:
        """ONNX Runtime's CUDA provider or PyTorch in bf16, whichever runs a full batch faster here."""

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log.info("ONNX Runtime has no CUDA provider here; using PyTorch on the GPU")
            return TORCH
        self.session = self._session()
        batch = check_batch(self.image_size, 16)
        seconds = {}
        for runtime in (ONNXRUNTIME, TORCH):
            self.runtime = runtime
            self.predict_arrays(batch)  # warm-up: kernels, allocator, cuDNN autotuning
            t0 = time.perf_counter()
            for _ in range(5):
                self.predict_arrays(batch)
            seconds[runtime] = time.perf_counter() - t0
        best = min(seconds, key=seconds.get)
        log.info("GPU runtimes, 5 batches of 16: %s; using %s", seconds, best)
        if best == TORCH:
            self.session = None
        return best

    @classmethod
    def from_config(cls, cfg: "Config", ref: str | None = None, **kwargs: Any) -> "Predictor":
        """Load ``ref`` (default: the registry's alias, else its newest version) to run on
        ``predict.runtime``."""
        ref = ref or registry.default_model_ref(cfg.tracking)
        log.info("loading model %s", ref)
        kwargs.setdefault("runtime", cfg.predict.runtime)
        predictor = cls(model_store.load_model(cfg.tracking, ref), **kwargs)
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
            "runtime": self.runtime,
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
    def predict_arrays(self, images: np.ndarray) -> Scores:
        """The :class:`Scores` of a uint8 NHWC batch."""
        if len(images) == 0:
            return Scores.empty(len(self.classes))
        if self.runtime == ONNXRUNTIME:
            return run_onnx(self.session, images)
        # np.require copies only what PIL left read-only (torch wants writable memory)
        return self.predict_tensor(torch.from_numpy(np.require(images, requirements=["C", "W"])))

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor) -> Scores:
        """The :class:`Scores` of a uint8 NHWC tensor, wherever it is (one decoded on the device
        stays there)."""
        if self.runtime == ONNXRUNTIME:
            return run_onnx(self.session, images.cpu().numpy())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            probs, ood = self.graph(images.to(self.device))
        return Scores(probs.float().cpu().numpy(), ood.float().cpu().numpy())

    def predict(self, data: bytes) -> Prediction:
        """One image's prediction; raises :class:`ImageError` on bad bytes."""
        return self.prediction(self.predict_arrays(self.preprocess(data)[None]).rows()[0])

    def predict_many(self, images: Sequence[bytes]) -> list[Scores | ImageError]:
        """Each image's :class:`Scores`, or its decoding error, in order, with one forward pass
        for the decodable ones."""
        return self.decode_and_predict(images)[0]

    def decode_and_predict(
        self, images: Sequence[bytes]
    ) -> tuple[list[Scores | ImageError], list[np.ndarray | None]]:
        """:meth:`predict_many`, and the model inputs it decoded (None where decoding failed), which
        another model of the same input size can take as they are (a shadow rollout)."""
        rows = decode_rows(images, size=self.image_size, max_pixels=self.max_pixels, min_side=self.min_side)
        ok = rows.ok
        scores = iter(self.predict_arrays(rows.images[ok]).rows() if ok.any() else [])
        results = [next(scores) if good else ImageError(e) for good, e in zip(ok, rows.errors)]
        return results, [x if good else None for x, good in zip(rows.images, ok)]

    def prediction(self, scores: Scores) -> Prediction:
        """One image's :class:`Scores` as its :class:`Prediction`."""
        return prediction_from(scores, self.classes, self.top_k, self.calibration)

    def explain(self, data: bytes, *, display_size: int = 384) -> Explanation:
        """The prediction and a Grad-CAM heatmap of the top class over the photo."""
        arr = self.preprocess(data)  # the pixels predict() sees
        img = self.open(data, draft=False)  # the photo at full size, to draw on
        scores = self.predict_arrays(arr[None]).rows()[0]
        target = int(np.argmax(scores.probabilities))
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
        return Explanation(self.prediction(scores), heatmap, overlay_png(np.asarray(shown), heatmap))


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
