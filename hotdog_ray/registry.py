"""The MLflow store and its model registry: versions, aliases, and loading ``models:/`` references.

Every function names its store through the ``tracking`` config section and builds its own client,
so two configs in one process (tests, Tune) never write to each other's store; nothing here
touches MLflow's process-wide state. MLflow is imported inside functions: importing this module
stays cheap for the CLI and for Ray workers that never talk to the registry.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hotdog_ray.bundle import MODEL_DIR, ModelBundle, load_bundle
from hotdog_ray.errors import ModelError
from hotdog_ray.export import ONNX_TAG

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from hotdog_ray.config import TrackingSettings

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(tracking: "TrackingSettings") -> str:
    """The store: ``tracking.uri`` when set, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    Relative SQLite paths are made absolute so that Ray processes with another working directory
    write to the same file.
    """
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).absolute())
    return uri


def client(tracking: "TrackingSettings") -> "MlflowClient":
    """A client of the store ``tracking`` names."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(tracking))


def register(tracking: "TrackingSettings", run_id: str) -> str:
    """Register the model logged by ``run_id`` as a new version of ``tracking.registered_model``.

    A model logged before ONNX export existed is exported first (:func:`ensure_exported`); the
    version's ``onnx`` tag says whether it has a verified ONNX graph.
    """
    from mlflow.exceptions import MlflowException

    mlflow, name = client(tracking), tracking.registered_model
    onnx = ensure_exported(tracking, run_id)
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


def ensure_exported(tracking: "TrackingSettings", run_id: str) -> str:
    """The run's ``onnx`` tag; a model logged without one (before export existed) is rewritten
    in place as an MLflow model with its ONNX graph, so every version it backs gets it."""
    from hotdog_ray.tracking import Run

    run = Run(tracking_uri(tracking), run_id)
    tag = run.tag(ONNX_TAG)
    if tag is None:
        bundle = load_model(tracking, f"runs:/{run_id}")
        meta = {k: v for k, v in bundle.meta.items() if k != "run_id"}
        log.info("run %s's model predates ONNX export: exporting it now", run_id)
        run.log_model(bundle.model, meta)
        tag = run.tag(ONNX_TAG)
    return tag or ""


def ensure_version_exported(tracking: "TrackingSettings", version: str) -> str:
    """:func:`ensure_exported` for a registered version's run, and the outcome as the version's tag."""
    from mlflow.exceptions import MlflowException

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


def alias_version(tracking: "TrackingSettings", alias: str | None = None) -> str | None:
    """The version ``alias`` (default ``tracking.alias``) points at, or None when it is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(
            client(tracking)
            .get_model_version_by_alias(tracking.registered_model, alias or tracking.alias)
            .version
        )
    except MlflowException:
        return None


def delete_alias(tracking: "TrackingSettings", alias: str) -> None:
    """Remove ``alias`` from the registered model (nothing happens when it is not set)."""
    if alias_version(tracking, alias) is not None:
        client(tracking).delete_registered_model_alias(tracking.registered_model, alias)
        log.info("%s@%s removed", tracking.registered_model, alias)


def version_run_id(tracking: "TrackingSettings", version: str) -> str | None:
    """The run that produced a registered version."""
    return client(tracking).get_model_version(tracking.registered_model, version).run_id


def set_alias(tracking: "TrackingSettings", version: str, alias: str | None = None) -> None:
    """Point ``alias`` (default ``tracking.alias``) at ``version`` (which must exist)."""
    from mlflow.exceptions import MlflowException

    mlflow, name, alias = client(tracking), tracking.registered_model, alias or tracking.alias
    try:
        mlflow.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelError(f"{name} has no version {version} in {tracking_uri(tracking)}") from exc
    mlflow.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s", name, alias, version)


def default_model_ref(tracking: "TrackingSettings") -> str:
    """The registered model's alias (``tracking.alias``) when it is set, else its newest version."""
    name = tracking.registered_model
    if alias_version(tracking) is not None:
        return f"models:/{name}@{tracking.alias}"
    versions = client(tracking).search_model_versions(f"name='{name}'")
    if not versions:
        raise ModelError(
            f"no versions of registered model {name!r} in {tracking_uri(tracking)}: train one first"
        )
    latest = max(int(v.version) for v in versions)
    log.info("%s has no alias %r; using its newest version %d", name, tracking.alias, latest)
    return f"models:/{name}/{latest}"


def resolve_model_ref(tracking: "TrackingSettings", ref: str) -> str:
    """The concrete model a reference names now: an alias becomes ``models:/<name>/<version>``.

    Serving compares this between polls to notice that the alias moved.
    """
    from mlflow.exceptions import MlflowException

    if ref.startswith("models:/") and "@" in ref:
        name, alias = ref[len("models:/") :].split("@", 1)
        try:
            version = client(tracking).get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            raise ModelError(f"cannot resolve {ref} in {tracking_uri(tracking)}: {exc}") from exc
        return f"models:/{name}/{version}"
    return ref


def load_model(tracking: "TrackingSettings", ref: str) -> ModelBundle:
    """Load ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<id>`` or a local bundle dir."""
    from mlflow.exceptions import MlflowException

    try:
        return _load_model(tracking, ref)
    except (MlflowException, FileNotFoundError) as exc:
        raise ModelError(f"cannot load model {ref} from {tracking_uri(tracking)}: {exc}") from exc


def _load_model(tracking: "TrackingSettings", ref: str) -> ModelBundle:
    import mlflow

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


def run_metrics(tracking: "TrackingSettings", run_id: str) -> dict[str, float]:
    """The latest metrics of the run that produced a model (a served model's training and test scores)."""
    return dict(client(tracking).get_run(run_id).data.metrics)
