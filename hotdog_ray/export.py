"""Export: a trained network as an ONNX graph that ONNX Runtime runs, checked against PyTorch.

The graph holds the whole inference path after decoding: uint8 NHWC images in, calibrated class
probabilities and the out-of-distribution score out (rescale, the network, the temperature, sigmoid
or softmax, the energy; see :mod:`hotdog_ray.confidence`), so every runtime and MLflow's own tools
feed it the same pixels :func:`hotdog_ray.images.resize` produces and apply the same calibration. The batch axis is
dynamic and the opset fixed. An export counts only when ONNX Runtime's probabilities on a fixed
batch equal PyTorch's within :data:`TOLERANCE`; otherwise the model ships without ONNX and the
reason is recorded, never a silent mismatch.
"""

from __future__ import annotations

import copy
import io
import logging
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from hotdog_ray.bundle import save_bundle
from hotdog_ray.confidence import Calibration
from hotdog_ray.images import to_model_input
from hotdog_ray.models import knn_score, logits_and_features, probabilities
from hotdog_ray.onnxrt import INPUT_NAME, OOD_NAME, OUTPUT_NAME, Scores, onnx_session, run_onnx
from hotdog_ray.registry import ONNX_TAG

if TYPE_CHECKING:
    import mlflow
    import pandas

log = logging.getLogger(__name__)

OPSET = 18
TOLERANCE = 1e-4  # max abs difference of a probability or an OOD score, ONNX Runtime against PyTorch
CHECK_BATCH = 4


class InferenceGraph(torch.nn.Module):
    """What the ONNX file computes, and the PyTorch runtime too: uint8 NHWC images to calibrated
    class probabilities and the OOD score against the model's feature bank (NaN without a bank)."""

    def __init__(
        self,
        model: torch.nn.Module,
        rescale: str,
        calibration: Calibration = Calibration(),
        bank: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.model, self.rescale = model, rescale
        self.temperature, self.neighbours = calibration.temperature, calibration.neighbours
        self.register_buffer("bank", None if bank is None else torch.from_numpy(np.asarray(bank, np.float32)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = logits_and_features(self.model, to_model_input(images, self.rescale))
        probs = probabilities(logits, self.temperature)
        if self.bank is None:
            return probs, torch.full_like(probs[:, 0], float("nan"))
        # float32 even under a GPU's autocast: bf16 cosines would move answers across the threshold
        with torch.autocast(images.device.type, enabled=False):
            return probs, knn_score(features, self.bank, self.neighbours)


@dataclass
class OnnxExport:
    """The exported graph (None when the export failed or did not match) and why."""

    model: bytes | None
    max_abs_diff: float | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.model is not None

    @property
    def tag(self) -> str:
        return "exported" if self.ok else f"failed: {self.reason}"[:500]


def check_batch(image_size: int, n: int = CHECK_BATCH, seed: int = 0) -> np.ndarray:
    """A fixed uint8 NHWC batch to compare runtimes on (pure: the same for the same arguments)."""
    return np.random.default_rng(seed).integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)


def torch_scores(graph: torch.nn.Module, images: np.ndarray) -> Scores:
    with torch.inference_mode():
        probs, ood = graph(torch.from_numpy(images))
    return Scores(probs.numpy(), ood.numpy())


def max_difference(got: Scores, want: Scores) -> float:
    """The largest difference of a probability or an OOD score (both NaN: no score, no difference)."""
    ood = np.where(np.isnan(got.ood_score) & np.isnan(want.ood_score), 0.0, got.ood_score - want.ood_score)
    return float(max(np.abs(got.probabilities - want.probabilities).max(), np.abs(ood).max()))


def export_onnx(
    model: torch.nn.Module,
    meta: dict[str, Any],
    bank: np.ndarray | None = None,
    *,
    tolerance: float = TOLERANCE,
) -> OnnxExport:
    """``model`` (any device, any mode) with its calibration and OOD ``bank`` as ONNX bytes,
    verified on :func:`check_batch`."""
    graph = InferenceGraph(
        copy.deepcopy(model).float().cpu(), meta["rescale"], Calibration.of(meta), bank
    ).eval()
    images = check_batch(int(meta["image_size"]))
    try:
        data = _export(graph, images)
        _check_graph(data)
        session = onnx_session(data, threads=1)
        got = run_onnx(session, images)
    except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure means: ship without ONNX
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("ONNX export of %s failed, registering without it: %s", meta["name"], reason)
        return OnnxExport(None, reason=reason)
    diff = max_difference(got, torch_scores(graph, images))
    if not diff <= tolerance:  # also catches NaN
        reason = f"ONNX Runtime differs from PyTorch by {diff:.2e} (tolerance {tolerance:.0e})"
        log.warning("ONNX export of %s does not match, registering without it: %s", meta["name"], reason)
        return OnnxExport(None, diff, reason)
    log.info("exported %s to ONNX (opset %d, max abs difference %.1e)", meta["name"], OPSET, diff)
    return OnnxExport(data, diff)


def _export(graph: torch.nn.Module, images: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter: deprecated in favour of the dynamo one, which takes 2-4 s per zoo
        # model against 0.05-0.3 s and gives the same graph for these plain CNNs.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.from_numpy(images),),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, OOD_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}, OOD_NAME: {0: "batch"}},
        )
    return buf.getvalue()


def _check_graph(data: bytes) -> None:
    # Only an export checks a graph; serving and scoring import this module through the model
    # store, and onnx's import (its ml_dtypes extension) would lengthen every replica's start.
    import onnx  # noqa: PLC0415 - an export's check alone needs onnx (see above)

    onnx.checker.check_model(onnx.load_from_string(data))


# ---------------------------------------------------------------------------------------------
# The MLflow model


PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def save_mlflow_model(
    directory: str | Path, model: torch.nn.Module, meta: dict[str, Any], bank: np.ndarray | None = None
) -> OnnxExport:
    """Write ``model`` as an MLflow model folder at ``directory`` (which must not exist).

    The pyfunc flavor is defined from code (:mod:`hotdog_ray.pyfunc_model`, nothing pickled); its
    one artifact is the bundle (weights, spec and the ONNX graph when it exported and matched),
    with a signature (image bytes in; label, probability and one column per class out) and an
    input example, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` take it as it is.
    """

    exported = export_onnx(model, meta, bank)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"  # the artifact's folder name inside the MLflow model
        save_bundle(bundle, model, meta, exported.model, bank)
        mlflow.pyfunc.save_model(
            str(directory),
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle)},
            signature=pyfunc_signature(meta["classes"]),
            input_example=pd_input_example(int(meta["image_size"])),
            # Listed, not inferred: inferring loads the model in a subprocess (seconds per log).
            # hotdog_ray itself must be importable where the model loads (--env-manager local).
            pip_requirements=_requirements(),
            metadata={"hotdog_ray": {"architecture": meta["name"], ONNX_TAG: exported.tag}},
        )
    return exported


def pyfunc_signature(classes: Sequence[str]) -> "mlflow.models.ModelSignature":
    """Image file bytes in; label, its probability, each class's probability and the
    out-of-distribution score and flag out."""

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [ColSpec("string", "label"), ColSpec("double", "probability")]
            + [ColSpec("double", probability_column(c)) for c in classes]
            + [ColSpec("double", "ood_score"), ColSpec("boolean", "in_distribution")]
        ),
    )


def probability_column(label: str) -> str:
    return f"probability_{label}"


def pd_input_example(image_size: int) -> "pandas.DataFrame":
    """One grey PNG of the model's input size, as the pyfunc takes it."""

    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


def _requirements() -> list[str]:

    out = []
    for name in ("mlflow", "torch", "torchvision", "onnxruntime", "pillow", "numpy", "pandas"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out
