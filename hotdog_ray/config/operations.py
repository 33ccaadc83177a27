"""Operations: the MLflow store and registry, and watching the model at work."""

from __future__ import annotations

from pydantic import Field

from hotdog_ray.config.base import Section

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # a file beside the working directory


class TrackingSettings(Section):
    """MLflow tracking and registry."""

    uri: str | None = Field(
        None,
        description="MLflow store; default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db (working directory)",
    )
    experiment: str = "hotdog-ray"
    registered_model: str = "hotdog-classifier"
    alias: str = "champion"
    challenger_alias: str = Field("challenger", description="the version rollout.mode tries on live traffic")


class MonitorSettings(Section):
    """Watching the model in production: drift against the training reference, progress on long jobs."""

    psi_threshold: float = Field(
        0.2, gt=0, description="population stability index above which a day is flagged as drifted"
    )
    low_confidence: float = Field(
        0.6, gt=0, le=1, description="answers below this probability count as low-confidence"
    )
    max_low_confidence_increase: float = Field(
        0.2, ge=0, le=1, description="flag a day whose low-confidence share rose by more than this"
    )
    ood_acceptance: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="share of validation images the out-of-distribution threshold accepts (set at training)",
    )
    max_ood_increase: float = Field(
        0.1,
        ge=0,
        le=1,
        description="flag a day whose out-of-distribution share rose past the validation rate by more than this",
    )
    progress_interval_s: float = Field(
        30.0, gt=0, description="hotdog score and inspect log a progress line this often"
    )
    metrics_linger_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="hotdog score waits this long after a run so that Prometheus scrapes its hotdog_score_* "
        "series before the job's Ray goes (a nightly RayJob on Kubernetes: at least two scrape intervals)",
    )
