"""Models in MLflow: logging a trained network to a run, registering it, and loading any model
reference (``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<id>`` or a bundle
folder) as a :class:`~hotdog_ray.bundle.ModelBundle`. A model logged before ONNX export existed is
exported when it is registered or promoted."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from hotdog_ray.bundle import ModelBundle, load_bundle
from hotdog_ray.config import TrackingSettings
from hotdog_ray.errors import ModelError
from hotdog_ray.export import save_mlflow_model
from hotdog_ray.process import interrupts_deferred
from hotdog_ray.registry import MODEL_DIR, ONNX_TAG, client, tracking_uri
from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)


def log_model(
    run: Run, model: torch.nn.Module, meta: dict[str, Any], ood_bank: np.ndarray | None = None
) -> bool:
    """The model as an MLflow model (bundle, ONNX graph, pyfunc) under the run's ``model/``
    artifacts (register it with :func:`register`); True when the ONNX export matched. The outcome
    is the run's ``onnx`` tag."""
    with tempfile.TemporaryDirectory() as tmp:
        exported = save_mlflow_model(Path(tmp) / MODEL_DIR, model, meta, ood_bank)
        run.client.log_artifacts(run.id, str(Path(tmp) / MODEL_DIR), MODEL_DIR)
    run.set_tags({ONNX_TAG: exported.tag})
    return exported.ok


def register(tracking: TrackingSettings, run_id: str) -> str:
    """Register the model logged by ``run_id`` as a new version of ``tracking.registered_model``.

    A model logged before ONNX export existed is exported first (:func:`ensure_exported`); the
    version's ``onnx`` tag says whether it has a verified ONNX graph.
    """
    mlflow, name = client(tracking), tracking.registered_model
    onnx = ensure_exported(tracking, run_id)
    with interrupts_deferred():  # the run that registers ends KILLED on Ctrl-C: leave its store unlocked
        try:
            mlflow.get_registered_model(name)
        except MlflowException:
            mlflow.create_registered_model(name, description="hotdog-ray image classifier")
        run = mlflow.get_run(run_id)
        source = f"{run.info.artifact_uri}/{MODEL_DIR}"
        version = mlflow.create_model_version(
            name, source, run_id=run_id, tags={"model": run.data.tags.get("model", ""), ONNX_TAG: onnx}
        )
    log.info("registered %s version %s (ONNX: %s)", name, version.version, onnx)
    return str(version.version)


def ensure_exported(tracking: TrackingSettings, run_id: str) -> str:
    """The run's ``onnx`` tag; a model logged without one (before export existed) is rewritten
    in place as an MLflow model with its ONNX graph, so every version it backs gets it."""
    run = Run(tracking_uri(tracking), run_id)
    tag = run.tag(ONNX_TAG)
    if tag is None:
        bundle = load_model(tracking, f"runs:/{run_id}")
        meta = {k: v for k, v in bundle.meta.items() if k != "run_id"}
        log.info("run %s's model predates ONNX export: exporting it now", run_id)
        log_model(run, bundle.model, meta, bundle.ood_bank)
        tag = run.tag(ONNX_TAG)
    return tag or ""


def ensure_version_exported(tracking: TrackingSettings, version: str) -> str:
    """:func:`ensure_exported` for a registered version's run, and the outcome as the version's tag."""
    mlflow, name = client(tracking), tracking.registered_model
    try:
        found = mlflow.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelError(f"{name} has no version {version} in {tracking_uri(tracking)}") from exc
    onnx = found.tags.get(ONNX_TAG)
    if onnx is None and found.run_id:
        onnx = ensure_exported(tracking, found.run_id)
        mlflow.set_model_version_tag(name, version, ONNX_TAG, onnx)
    return onnx or ""


def load_model(tracking: TrackingSettings, ref: str) -> ModelBundle:
    """Load ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<id>`` or a local bundle dir."""
    try:
        return _load_model(tracking, ref)
    except (MlflowException, FileNotFoundError) as exc:
        raise ModelError(f"cannot load model {ref} from {tracking_uri(tracking)}: {exc}") from exc


def _load_model(tracking: TrackingSettings, ref: str) -> ModelBundle:
    mlflow_client = client(tracking)
    if ref.startswith("models:/"):
        name, _, rest = ref[len("models:/") :].partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            version = mlflow_client.get_model_version_by_alias(name, alias)
        else:
            version = mlflow_client.get_model_version(name, rest)
        source = version.source
        provenance = {"registered_model": name, "version": str(version.version), "run_id": version.run_id}
    elif ref.startswith("runs:/"):
        run_id = ref[len("runs:/") :].strip("/")
        source, provenance = (
            f"{mlflow_client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}",
            {"run_id": run_id},
        )
    else:
        return load_bundle(ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri(tracking)
        )
        bundle = load_bundle(local)
    bundle.meta.update(provenance)
    return bundle
