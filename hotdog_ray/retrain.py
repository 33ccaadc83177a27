"""Retraining when the field says so (``hotdog retrain``, ``jobs/retrain.py``).

The triggers (``loop.*``): at least ``min_new_labels`` labelled images came in since the
champion was registered, or drift checks flagged at least ``min_drift_days`` of the last
``drift_days`` days, or ``--force``. With none, nothing changes and one line says why. With one,
the labelled feedback is exported (:mod:`hotdog_ray.feedback`), the champion's weights are
fine-tuned for ``loop.epochs`` with every export added to the training split
(``data.extra_roots``), and the result is registered as a candidate, tagged with the champion it
started from and the trigger, and made the challenger (``tracking.challenger_alias``), which
replicas with ``rollout.mode`` shadow and ``hotdog gate`` judges.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from hotdog_ray import feedback, model_store, registry
from hotdog_ray.errors import ModelError
from hotdog_ray.promote import set_challenger
from hotdog_ray.train import run_training

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

FROM_TAG, TRIGGER_TAG = "retrained_from", "trigger"


@dataclass
class Outcome:
    """What one ``hotdog retrain`` did."""

    retrained: bool
    reason: str
    champion: str | None = None
    candidate: str | None = None
    run_id: str | None = None
    export: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flagged_days(cfg: "Config", now: float | None = None) -> list[str]:
    """The days among the last ``loop.drift_days`` whose drift check (``hotdog drift`` or a
    nightly scoring run) was flagged, from MLflow."""
    mlflow = registry.client(cfg.tracking)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return []
    since = dt.date.fromtimestamp(now or time.time()) - dt.timedelta(days=cfg.loop.drift_days)
    found = mlflow.search_runs([experiment.experiment_id], "metrics.drift_flagged = 1", max_results=1000)
    days = {r.data.tags.get("date", "") for r in found}
    return sorted(d for d in days if d and d > since.isoformat())


def trigger(cfg: "Config", champion: str, *, force: bool = False) -> str | None:
    """Why to retrain now (None: no trigger fired)."""
    if force:
        return "forced"
    r = cfg.loop
    created = registry.client(cfg.tracking).get_model_version(cfg.tracking.registered_model, champion)
    since = created.creation_timestamp / 1000
    new = [x for x in feedback.read_labelled(cfg) if x.time > since] if cfg.prediction_log.location else []
    if len(new) >= r.min_new_labels:
        return f"{len(new)} new labelled images since version {champion} (loop.min_new_labels {r.min_new_labels})"
    days = flagged_days(cfg)
    if len(days) >= r.min_drift_days:
        return f"drift flagged on {len(days)} of the last {r.drift_days} days ({', '.join(days)})"
    return None


def why_not(cfg: "Config", champion: str) -> str:
    r = cfg.loop
    return (
        f"no trigger: fewer than {r.min_new_labels} labelled images since version {champion}, drift "
        f"flagged on fewer than {r.min_drift_days} of the last {r.drift_days} days (--force retrains anyway)"
    )


def fine_tune_config(cfg: "Config", meta: dict[str, Any], extra_roots: list[str]) -> "Config":
    """``cfg`` made to train the champion's network again (its architecture, widths, input size,
    rescale and classes, from its spec) for ``loop.epochs``, with ``extra_roots`` added (pure).
    The optimizer and the rest of training come from ``cfg``: run the job with the champion's preset."""
    model = {k: meta.get(k) for k in ("name", "filters", "head_units", "dropout", "conv_dropout")}
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update=model),
            "data": cfg.data.model_copy(
                update={
                    "image_size": meta["image_size"],
                    "rescale": meta["rescale"],
                    "classes": list(meta["classes"]),
                    "max_classes": None,
                    "extra_roots": [*cfg.data.extra_roots, *extra_roots],
                }
            ),
            "train": cfg.train.model_copy(update={"epochs": cfg.loop.epochs, "run_name": None}),
        }
    )


def retrain(cfg: "Config", *, force: bool = False) -> Outcome:
    """Check the triggers and, if one fires, fine-tune the champion into the challenger."""
    t = cfg.tracking
    champion = registry.alias_version(t)
    if champion is None:
        raise ModelError(
            f"{t.registered_model} has no {t.alias!r} version to retrain from; train and promote one"
        )
    reason = trigger(cfg, champion, force=force)
    if reason is None:
        return Outcome(retrained=False, reason=why_not(cfg, champion), champion=champion)
    log.info("retraining version %s: %s", champion, reason)
    bundle = model_store.load_model(t, f"models:/{t.registered_model}/{champion}")
    export = feedback.export(cfg, bundle.classes) if cfg.prediction_log.location else None
    extra = feedback.exported_folders(cfg) if cfg.prediction_log.location or cfg.loop.data_root else []
    tuned = fine_tune_config(cfg, bundle.meta, extra)
    tags = {FROM_TAG: champion, TRIGGER_TAG: reason[:5000], "kind": "retrain"}
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
    outcome = run_training(
        tuned,
        run_name=f"retrain-v{champion}-{day}-{uuid.uuid4().hex[:6]}",
        start_weights=bundle.model.state_dict(),
        tags=tags,
    )
    candidate = outcome.model_version
    mlflow = registry.client(t)
    for key, value in tags.items():
        mlflow.set_model_version_tag(t.registered_model, candidate, key, value)
    set_challenger(cfg, candidate)
    log.info("version %s (from %s) is the challenger", candidate, champion)
    return Outcome(
        retrained=True,
        reason=reason,
        champion=champion,
        candidate=candidate,
        run_id=outcome.run_id,
        export=export.to_dict() if export else None,
    )
