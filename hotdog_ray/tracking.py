"""MLflow: one run per training run, per-epoch curves, artifacts, and the model registry.

Models are stored as a plain state dict (``weights.pt``) plus ``model.json`` (zoo name, classes,
input size, rescale) and rebuilt through the zoo: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

MODEL_DIR = "model"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(cfg: "Config") -> str:
    """The store: ``tracking.uri`` when set, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    Relative SQLite paths are made absolute so that Ray processes with another working directory
    write to the same file. Nothing here touches MLflow's process-wide state: every call names its
    store, so two configs in one process (tests, Tune) never write to each other's.
    """
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


def _client(cfg: "Config"):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(cfg))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


PARENT_TAG = "mlflow.parentRunId"  # MLflow's own key: the UI nests child runs under it


def start_run(cfg: "Config", *, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """Create the MLflow run with the config as params; returns its id (the run stays open).

    With ``parent_run_id`` the run is a child (a sweep's trial) and shows nested under it.
    """
    from mlflow.entities import Param, RunTag

    from hotdog_ray.config import flatten

    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    params = [Param(k, "" if v is None else str(v)[:500]) for k, v in flatten(cfg).items()]
    if parent_run_id:
        tags = {**tags, PARENT_TAG: parent_run_id}
    client.log_batch(run_id, params=params, tags=[RunTag(k, v) for k, v in {"git_commit": git_commit(), **tags}.items()])
    return run_id


def child_runs(cfg: "Config", parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id`` (a sweep's trials), oldest first."""
    client = _client(cfg)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)


def end_run(cfg: "Config", run_id: str, status: str = "FINISHED") -> None:
    _client(cfg).set_terminated(run_id, status=status)


def reopen_run(cfg: "Config", run_id: str) -> None:
    """Mark an ended run as running again (a resumed sweep continues its own run)."""
    _client(cfg).update_run(run_id, status="RUNNING")


def find_runs(cfg: "Config", tags: dict[str, str]) -> list:
    """Runs of ``tracking.experiment`` carrying all of ``tags``, newest first."""
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment.experiment_id], query, order_by=["attributes.start_time DESC"])


def recent_runs(cfg: "Config", limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs of ``tracking.experiment`` with their key metrics (for ``hotdog runs``)."""
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    rows = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=limit):
        tags, m = run.data.tags, run.data.metrics
        kind = tags.get("kind") or ("trial" if PARENT_TAG in tags else "train")
        rows.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "kind": kind, "status": run.info.status,
            "start": run.info.start_time, "model": tags.get("model", ""),
            "val_loss": m.get("best_val_loss", m.get("val_loss")),
            "val_accuracy": m.get("best_val_accuracy", m.get("val_accuracy")),
            "test_balanced_accuracy": m.get("test_balanced_accuracy"),
            "parent": tags.get(PARENT_TAG), "promotion": tags.get("promotion"),
        })
    return rows


DIVERGED_TAG = "diverged"


def run_tag(cfg: "Config", run_id: str, key: str) -> str | None:
    """A tag of a run, or None."""
    return _client(cfg).get_run(run_id).data.tags.get(key)


def log_epoch(uri: str, run_id: str, metrics: dict[str, Any]) -> None:
    """One epoch's finite numeric metrics at step ``epoch``; a divergence becomes a tag on the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if metrics.get("diverged"):
        # Train V2's Result keeps the last checkpointed metrics only; the tag carries the reason home.
        client.set_tag(run_id, DIVERGED_TAG, metrics["diverged"])
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v)}
    _log_batch(client, run_id, numeric, step=int(metrics["epoch"]))


def _log_batch(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics in one request (a remote tracking server costs a round trip per call)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _epoch_logger_class():
    import ray.train

    class EpochLogger(ray.train.UserCallback):
        """Logs rank 0's metrics of every epoch to the run as they are reported (curves survive a crash)."""

        def __init__(self, uri: str, run_id: str) -> None:
            self.uri, self.run_id = uri, run_id

        def after_report(self, run_context, metrics, checkpoint) -> None:
            log_epoch(self.uri, self.run_id, metrics[0])

    return EpochLogger


def epoch_logger(cfg: "Config", run_id: str):
    return _epoch_logger_class()(tracking_uri(cfg), run_id)


@dataclass
class ModelBundle:
    """A trained model with what it takes to use it: classes, input size, rescale."""

    model: torch.nn.Module
    meta: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def model_meta(cfg: "Config", classes: list[str]) -> dict[str, Any]:
    return {
        "name": cfg.model.name, "classes": classes, "image_size": cfg.data.image_size,
        "rescale": cfg.data.rescale, "filters": cfg.model.filters, "dropout": cfg.model.dropout,
        "conv_dropout": cfg.model.conv_dropout,
    }


def build_from_meta(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from hotdog_ray.models import build_model

    model = build_model(meta["name"], len(meta["classes"]), meta["image_size"], filters=meta.get("filters"),
                        dropout=meta.get("dropout"), conv_dropout=meta.get("conv_dropout"))
    model.load_state_dict(state)
    return model.eval()


def save_bundle(directory: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "model.json").write_text(json.dumps(meta, indent=2))


def load_bundle(directory: str | Path) -> ModelBundle:
    directory = Path(directory)
    meta = json.loads((directory / "model.json").read_text())
    state = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
    return ModelBundle(build_from_meta(meta, state), meta)


def log_model(cfg: "Config", run_id: str, model: torch.nn.Module, meta: dict[str, Any], *,
              register: bool = True) -> str | None:
    """Log the model under the run's ``model/`` artifacts and register a new version; returns it."""
    client = _client(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(tmp, model, meta)
        client.log_artifacts(run_id, tmp, MODEL_DIR)
    return register_run_model(cfg, run_id) if register else None


def register_run_model(cfg: "Config", run_id: str) -> str:
    """Register the model logged by ``run_id`` as a new version of ``tracking.registered_model``."""
    client = _client(cfg)
    name = cfg.tracking.registered_model
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="hotdog-ray image classifier")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
    version = client.create_model_version(name, source, run_id=run_id, tags={"model": run_tag(cfg, run_id, "model") or ""})
    log.info("registered %s version %s", name, version.version)
    return str(version.version)


def alias_version(cfg: "Config") -> str | None:
    """The version ``tracking.alias`` points at, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(cfg).get_model_version_by_alias(cfg.tracking.registered_model, cfg.tracking.alias).version)
    except MlflowException:
        return None


def version_run_id(cfg: "Config", version: str) -> str | None:
    """The run that produced a registered version."""
    return _client(cfg).get_model_version(cfg.tracking.registered_model, version).run_id


def set_alias(cfg: "Config", version: str) -> None:
    """Point ``tracking.alias`` at ``version`` (which must exist)."""
    from mlflow.exceptions import MlflowException

    client, name = _client(cfg), cfg.tracking.registered_model
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelError(f"{name} has no version {version} in {tracking_uri(cfg)}") from exc
    client.set_registered_model_alias(name, cfg.tracking.alias, version)
    log.info("%s@%s -> version %s", name, cfg.tracking.alias, version)


class ModelError(LookupError):
    """A model reference that names no model in the tracking store."""


def default_model_ref(cfg: "Config") -> str:
    """The registered model's alias (``tracking.alias``) when it is set, else its newest version."""
    from mlflow.exceptions import MlflowException
    client, name = _client(cfg), cfg.tracking.registered_model
    try:
        client.get_model_version_by_alias(name, cfg.tracking.alias)
        return f"models:/{name}@{cfg.tracking.alias}"
    except MlflowException:
        versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ModelError(f"no versions of registered model {name!r} in {tracking_uri(cfg)}: train one first")
    latest = max(int(v.version) for v in versions)
    log.info("%s has no alias %r; using its newest version %d", name, cfg.tracking.alias, latest)
    return f"models:/{name}/{latest}"


def load_model(cfg: "Config", ref: str) -> ModelBundle:
    """Load ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<id>`` or a local bundle dir."""
    from mlflow.exceptions import MlflowException

    try:
        return _load_model(cfg, ref)
    except (MlflowException, FileNotFoundError) as exc:
        raise ModelError(f"cannot load model {ref} from {tracking_uri(cfg)}: {exc}") from exc


def _load_model(cfg: "Config", ref: str) -> ModelBundle:
    import mlflow

    client = _client(cfg)
    if ref.startswith("models:/"):
        name, _, rest = ref[len("models:/"):].partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, rest)
        source = version.source
        meta_extra = {"registered_model": name, "version": str(version.version), "run_id": version.run_id}
    elif ref.startswith("runs:/"):
        run_id = ref[len("runs:/"):].strip("/")
        source, meta_extra = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}", {"run_id": run_id}
    else:
        bundle = load_bundle(ref)
        return bundle
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri(cfg))
        bundle = load_bundle(local)
    bundle.meta.update(meta_extra)
    return bundle


def resolve_model_ref(cfg: "Config", ref: str) -> str:
    """The concrete model a reference names now: an alias becomes ``models:/<name>/<version>``.

    Serving compares this between polls to notice that the alias moved.
    """
    if ref.startswith("models:/") and "@" in ref:
        name, alias = ref[len("models:/"):].split("@", 1)
        try:
            version = _client(cfg).get_model_version_by_alias(name, alias).version
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for "no such alias"
            raise ModelError(f"cannot resolve {ref} in {tracking_uri(cfg)}: {exc}") from exc
        return f"models:/{name}/{version}"
    return ref


def run_metrics(cfg: "Config", run_id: str) -> dict[str, float]:
    """A run's latest metrics (a served model's training and test scores)."""
    return dict(_client(cfg).get_run(run_id).data.metrics)


def log_figure(run_id: str, cfg: "Config", fig, name: str) -> None:
    _client(cfg).log_figure(run_id, fig, name)


def log_dict(run_id: str, cfg: "Config", data: Any, name: str) -> None:
    _client(cfg).log_dict(run_id, data, name)


def log_text(run_id: str, cfg: "Config", text: str, name: str) -> None:
    _client(cfg).log_text(run_id, text, name)


def set_tags(cfg: "Config", run_id: str, tags: dict[str, str]) -> None:
    client = _client(cfg)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def log_metrics(run_id: str, cfg: "Config", metrics: dict[str, float]) -> None:
    _log_batch(_client(cfg), run_id, metrics)
