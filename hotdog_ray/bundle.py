"""The model bundle: what a trained model is on disk, in MLflow and in the object store.

A bundle is a folder with ``weights.pt`` (a plain state dict), ``model.json`` (zoo name,
classes, input size, rescale, widths, calibration), ``ood_bank.npy`` (the training images'
features the out-of-distribution score compares with, :mod:`hotdog_ray.confidence`; read without
pickle) and, when the export matched, ``model.onnx`` (see :mod:`hotdog_ray.export`). Loading rebuilds the network through the zoo and reads the weights
with ``torch.load(weights_only=True)``: nothing is ever unpickled, so a bundle from an untrusted
store cannot run code. Serving, scoring and evaluation depend on this module only.

In MLflow a model is an MLflow model folder whose pyfunc artifact ``bundle`` is the bundle
(``model/artifacts/bundle/``); versions registered before that keep the bundle at the folder's
top (``model/weights.pt``), and :func:`load_bundle` reads both.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hotdog_ray import zoo
from hotdog_ray.models import build_model

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"
ONNX_FILE = "model.onnx"
BANK_FILE = "ood_bank.npy"
PYFUNC_BUNDLE = "artifacts/bundle"  # where the bundle lies inside an MLflow model folder


@dataclass
class ModelBundle:
    """A trained model with what it takes to use it: classes, input size, rescale."""

    model: torch.nn.Module
    meta: dict[str, Any]
    onnx: bytes | None = field(default=None, repr=False)  # the verified ONNX graph, when exported
    ood_bank: np.ndarray | None = field(default=None, repr=False)  # None: trained before the OOD score

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def model_meta(cfg: "Config", classes: list[str]) -> dict[str, Any]:
    """The JSON spec of a model trained with ``cfg`` on ``classes``."""
    m = cfg.model
    return {
        "name": m.name,
        "classes": classes,
        "image_size": cfg.data.image_size,
        "rescale": cfg.data.rescale,
        "filters": m.filters,
        "head_units": m.head_units,
        "dropout": m.dropout,
        "conv_dropout": m.conv_dropout,
    }


def build_from_meta(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The network a spec describes, with ``state`` loaded, in eval mode."""
    head_units = meta.get("head_units")
    filters = meta.get("filters")
    if meta["name"] in zoo.TRANSFER and head_units is None:
        # Bundles written before model.head_units existed kept the transfer head's width in "filters".
        head_units, filters = filters, None
    model = build_model(
        meta["name"],
        len(meta["classes"]),
        meta["image_size"],
        filters=filters,
        head_units=head_units,
        dropout=meta.get("dropout"),
        conv_dropout=None if meta["name"] in zoo.TRANSFER else meta.get("conv_dropout"),
    )
    model.load_state_dict(state)
    return model.eval()


def save_bundle(
    directory: str | Path,
    model: torch.nn.Module,
    meta: dict[str, Any],
    onnx: bytes | None = None,
    ood_bank: np.ndarray | None = None,
) -> None:
    """Write ``model``, its spec, its ONNX graph and its OOD bank (those it has) into ``directory``
    (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(meta, indent=2))
    if onnx is not None:
        (directory / ONNX_FILE).write_bytes(onnx)
    if ood_bank is not None:
        np.save(directory / BANK_FILE, np.asarray(ood_bank, np.float32), allow_pickle=False)


def bundle_dir(directory: str | Path) -> Path:
    """The bundle inside ``directory``: an MLflow model folder's ``bundle`` artifact, else the folder
    itself (a plain bundle, or a version logged before models were MLflow models; such a folder
    exported later holds both, and the artifact has the ONNX graph)."""
    directory = Path(directory)
    nested = directory / PYFUNC_BUNDLE
    return nested if (nested / SPEC_FILE).exists() else directory


def load_bundle(directory: str | Path) -> ModelBundle:
    """Read a bundle written by :func:`save_bundle`, alone or in an MLflow model (weights only, never pickles)."""
    directory = bundle_dir(directory)
    meta = json.loads((directory / SPEC_FILE).read_text())
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    onnx, bank = directory / ONNX_FILE, directory / BANK_FILE
    return ModelBundle(
        build_from_meta(meta, state),
        meta,
        onnx.read_bytes() if onnx.exists() else None,
        np.load(bank, allow_pickle=False) if bank.exists() else None,
    )
