"""Operations: the MLflow store and registry, and watching the model at work."""

from __future__ import annotations

from typing import Literal

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


class LoopSettings(Section):
    """The closed loop, in one place: when labelled feedback or drift start a fine-tune of the
    champion (``hotdog retrain``), the gate that judges the candidate (``hotdog gate``), and how long
    ``hotdog loop`` lets it shadow."""

    data_root: str | None = Field(
        None,
        description="where exported feedback goes, a dated folder a run (default: <prediction_log.location>/training-data)",
    )
    min_new_labels: int = Field(
        50,
        ge=1,
        description="retrain once this many labelled images came in since the champion was registered",
    )
    drift_days: int = Field(7, ge=1, description="the days of drift checks looked at")
    min_drift_days: int = Field(2, ge=1, description="retrain once this many of them were flagged")
    epochs: int = Field(5, ge=1, description="epochs of the fine-tune from the champion's weights")
    high_confidence: float = Field(
        0.9, gt=0, le=1, description="feedback contradicting an answer this sure is counted as a surprise"
    )
    accuracy_margin: float = Field(
        0.01,
        ge=0,
        le=1,
        description="the candidate's accuracy and balanced accuracy may trail by at most this",
    )
    recall_margin: float = Field(
        0.05, ge=0, le=1, description="no class's recall may drop by more than this (the slice check)"
    )
    invariance_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="the share of test images whose label survives a flip, a brightness change or a crop "
        "may trail the champion's by at most this",
    )
    invariances: list[Literal["horizontal flip", "brightness", "crop"]] = Field(
        default_factory=lambda: ["horizontal flip", "brightness", "crop"],
        description="changes the labels must survive: a horizontal flip, a 15% brightness change, a 90% centre "
        "crop (leave out what your classes do not survive: a flipped digit is another glyph)",
    )
    bootstrap_samples: int = Field(
        1000, ge=100, le=100_000, description="resamples for the confidence intervals"
    )
    min_live_requests: int = Field(
        0, ge=0, description="shadow requests the gate's live checks need (0: decide on the test split alone)"
    )
    max_p99_latency_ms: float | None = Field(
        None, gt=0, description="the candidate's p99 latency on live traffic must stay under this"
    )
    shadow_deadline_s: float = Field(
        3600.0,
        gt=0,
        description="hotdog loop waits this long for min_live_requests shadow requests, then decides",
    )
    poll_interval_s: float = Field(10.0, gt=0, description="how often hotdog loop reads the shadow figures")
