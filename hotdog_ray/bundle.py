"""The model bundle: what a trained model is on disk, in MLflow and in the object store.

A bundle is a folder with ``weights.pt`` (a plain state dict) and ``model.json`` (zoo name,
classes, input size, rescale, widths). Loading rebuilds the network through the zoo and reads the
weights with ``torch.load(weights_only=True)``: nothing is ever unpickled, so a bundle from an
untrusted store cannot run code. Serving, scoring and evaluation depend on this module only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # the bundle's folder among a run's artifacts
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"


@dataclass
class ModelBundle:
    """A trained model with what it takes to use it: classes, input size, rescale."""

    model: torch.nn.Module
    meta: dict[str, Any]

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
    from hotdog_ray.models import TRANSFER, build_model

    head_units = meta.get("head_units")
    filters = meta.get("filters")
    if meta["name"] in TRANSFER and head_units is None:
        # Bundles written before model.head_units existed kept the transfer head's width in "filters".
        head_units, filters = filters, None
    model = build_model(
        meta["name"],
        len(meta["classes"]),
        meta["image_size"],
        filters=filters,
        head_units=head_units,
        dropout=meta.get("dropout"),
        conv_dropout=None if meta["name"] in TRANSFER else meta.get("conv_dropout"),
    )
    model.load_state_dict(state)
    return model.eval()


def save_bundle(directory: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write ``model`` and its spec into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(meta, indent=2))


def load_bundle(directory: str | Path) -> ModelBundle:
    """Read a bundle folder written by :func:`save_bundle` (weights only, never pickles)."""
    directory = Path(directory)
    meta = json.loads((directory / SPEC_FILE).read_text())
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return ModelBundle(build_from_meta(meta, state), meta)
