"""MLflow: one run per training run, per-epoch curves, artifacts, and the model registry.

Models are stored as a plain state dict (``weights.pt``) plus ``model.json`` (zoo name, classes,
input size, rescale) and rebuilt through the zoo: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
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


def start_run(cfg: "Config", *, run_name: str, tags: dict[str, str]) -> str:
    """Create the MLflow run with the config as params; returns its id (the run stays open)."""
    from mlflow.entities import Param, RunTag

    from hotdog_ray.config import flatten

    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    params = [Param(k, "" if v is None else str(v)[:500]) for k, v in flatten(cfg).items()]
    client.log_batch(run_id, params=params, tags=[RunTag(k, v) for k, v in {"git_commit": git_commit(), **tags}.items()])
    return run_id


def end_run(cfg: "Config", run_id: str, status: str = "FINISHED") -> None:
    _client(cfg).set_terminated(run_id, status=status)


DIVERGED_TAG = "diverged"


def run_tag(cfg: "Config", run_id: str, key: str) -> str | None:
    """A tag of a run, or None."""
    return _client(cfg).get_run(run_id).data.tags.get(key)


def _epoch_logger_class():
    import ray.train

    class EpochLogger(ray.train.UserCallback):
        """Logs rank 0's metrics of every epoch to the run as they are reported (curves survive a crash)."""

        def __init__(self, uri: str, run_id: str) -> None:
            self.uri, self.run_id = uri, run_id

        def after_report(self, run_context, metrics, checkpoint) -> None:
            from mlflow.tracking import MlflowClient

            m = metrics[0]
            numeric = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and k != "epoch"}
            client = MlflowClient(self.uri)
            if m.get("diverged"):
                # Train V2's Result keeps the last checkpointed metrics only; the tag carries the reason home.
                client.set_tag(self.run_id, DIVERGED_TAG, m["diverged"])
            for k, v in numeric.items():
                client.log_metric(self.run_id, k, v, step=int(m["epoch"]))

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
    if not register:
        return None
    name = cfg.tracking.registered_model
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="hotdog-ray image classifier")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
    version = client.create_model_version(name, source, run_id=run_id, tags={"model": meta["name"]})
    log.info("registered %s version %s", name, version.version)
    return str(version.version)


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
        source, meta_extra = version.source, {"registered_model": name, "version": version.version}
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


def log_figure(run_id: str, cfg: "Config", fig, name: str) -> None:
    _client(cfg).log_figure(run_id, fig, name)


def log_dict(run_id: str, cfg: "Config", data: Any, name: str) -> None:
    _client(cfg).log_dict(run_id, data, name)


def log_text(run_id: str, cfg: "Config", text: str, name: str) -> None:
    _client(cfg).log_text(run_id, text, name)


def log_metrics(run_id: str, cfg: "Config", metrics: dict[str, float]) -> None:
    client = _client(cfg)
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
