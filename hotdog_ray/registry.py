"""The MLflow store and its model registry: versions, aliases, and resolving ``models:/`` references.

Every function names its store through the ``tracking`` config section and builds its own client,
so two configs in one process (tests, Tune) never write to each other's store; nothing here
touches MLflow's process-wide state. Nothing here needs torch: logging, registering and loading the
models themselves is :mod:`hotdog_ray.model_store`'s.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hotdog_ray.config import DEFAULT_TRACKING_URI, TrackingSettings
from hotdog_ray.errors import ModelError, TrackingError

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # a run's model among its artifacts (an MLflow model folder holding the bundle)
ONNX_TAG = "onnx"  # on the run and the version: "exported" or "failed: <reason>"


def tracking_uri(tracking: TrackingSettings) -> str:
    """The store: ``tracking.uri`` when set, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    Relative SQLite paths are made absolute so that Ray processes with another working directory
    write to the same file.
    """
    uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).absolute())
    return uri


# What MLflow can store runs in, by URI scheme (a SQLAlchemy URI may name its driver: postgresql+psycopg).
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # the servers' default ports


def check_store(tracking: TrackingSettings, timeout: float = 5.0) -> None:
    """Fail in seconds, with a :class:`TrackingError` saying what to do, where the store cannot
    work: an unknown scheme, a SQLite file in a missing folder, a server that does not answer.
    MLflow itself retries an unreachable server for minutes before it gives up."""
    uri = tracking_uri(tracking)
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0] if "://" in uri else "file"
    if scheme not in STORE_SCHEMES:
        raise TrackingError(
            f"tracking.uri {uri!r}: MLflow has no store for {scheme!r}; use sqlite:///PATH, "
            "http(s)://HOST:PORT (an mlflow server) or postgresql://USER:PASSWORD@HOST:PORT/DB"
        )
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking.uri {uri!r}: the folder {folder} does not exist; create it first")
    if scheme in DATABASE_PORTS:
        where = urllib.parse.urlsplit(uri)
        address = (where.hostname or "localhost", where.port or DATABASE_PORTS[scheme])
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError as exc:
            raise TrackingError(
                f"the MLflow store's database at {address[0]}:{address[1]} does not answer ({exc}): "
                "start it, or correct tracking.uri / MLFLOW_TRACKING_URI"
            ) from exc
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answers: a server without /health (a hosted MLflow) is still a server
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri} does not answer ({reason}): start it (mlflow server "
                "--port ...) or point tracking.uri / MLFLOW_TRACKING_URI at a running one"
            ) from exc


def client(tracking: TrackingSettings) -> MlflowClient:
    """A client of the store ``tracking`` names."""
    return MlflowClient(tracking_uri(tracking))


def alias_version(tracking: TrackingSettings, alias: str | None = None) -> str | None:
    """The version ``alias`` (default ``tracking.alias``) points at, or None when it is not set."""
    try:
        return str(
            client(tracking)
            .get_model_version_by_alias(tracking.registered_model, alias or tracking.alias)
            .version
        )
    except MlflowException:
        return None


def delete_alias(tracking: TrackingSettings, alias: str) -> None:
    """Remove ``alias`` from the registered model (nothing happens when it is not set)."""
    if alias_version(tracking, alias) is not None:
        client(tracking).delete_registered_model_alias(tracking.registered_model, alias)
        log.info("%s@%s removed", tracking.registered_model, alias)


def version_run_id(tracking: TrackingSettings, version: str) -> str | None:
    """The run that produced a registered version."""
    return client(tracking).get_model_version(tracking.registered_model, version).run_id


def set_alias(tracking: TrackingSettings, version: str, alias: str | None = None) -> None:
    """Point ``alias`` (default ``tracking.alias``) at ``version`` (which must exist)."""
    mlflow, name, alias = client(tracking), tracking.registered_model, alias or tracking.alias
    try:
        mlflow.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelError(f"{name} has no version {version} in {tracking_uri(tracking)}") from exc
    mlflow.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s", name, alias, version)


def default_model_ref(tracking: TrackingSettings) -> str:
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


def resolve_model_ref(tracking: TrackingSettings, ref: str) -> str:
    """The concrete model a reference names now: an alias becomes ``models:/<name>/<version>``.

    Serving compares this between polls to notice that the alias moved.
    """
    if ref.startswith("models:/") and "@" in ref:
        name, alias = ref[len("models:/") :].split("@", 1)
        try:
            version = client(tracking).get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            raise ModelError(f"cannot resolve {ref} in {tracking_uri(tracking)}: {exc}") from exc
        return f"models:/{name}/{version}"
    return ref


def run_metrics(tracking: TrackingSettings, run_id: str) -> dict[str, float]:
    """The latest metrics of the run that produced a model (a served model's training and test scores)."""
    return dict(client(tracking).get_run(run_id).data.metrics)
