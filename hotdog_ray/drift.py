"""Drift: does a day's traffic look like what the model was validated on?

At training, the model's *reference profile* is taken on the validation split (the share of each
predicted class and the histogram of confidences) and logged with its run
(``monitor/reference_profile.json``). A day's answers, from the prediction log or the nightly
scores, give the same profile; :func:`compare` measures the population stability index (PSI) of the
class shares and of the confidence histogram, and how much the share of low-confidence answers
rose, and flags the day when either PSI passes ``monitor.psi_threshold`` or that share rose by more
than ``monitor.max_low_confidence_increase``. Everything here is pure but :func:`reference_for`,
:func:`day_table`, :func:`read_parquet_folder`, :func:`assess` and :func:`check`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from hotdog_ray import predlog, registry, storage, telemetry, tracking
from hotdog_ray.errors import ConfigError, ModelError
from hotdog_ray.tables import render

if TYPE_CHECKING:
    import pyarrow as pa

    from hotdog_ray import storage
    from hotdog_ray.config import Config, MonitorSettings
    from hotdog_ray.tracking import Run

log = logging.getLogger(__name__)

REFERENCE_ARTIFACT = "monitor/reference_profile.json"
BINS = 10  # confidence histogram over [1/classes, 1]: the top probability never goes below it
EPS = 1e-4  # a share of zero would make PSI infinite: floor it, as PSI is usually computed


@dataclass
class Profile:
    """What a set of answers looks like: class shares and the confidence histogram."""

    classes: list[str]
    n: int
    class_share: dict[str, float]
    confidence_edges: list[float]
    confidence_share: list[float]
    low_confidence_share: float
    ood_share: float | None = None  # answers flagged out of distribution; None: not known


def profile(
    labels: Sequence[str],
    confidences: Sequence[float],
    classes: Sequence[str],
    low_confidence: float,
    in_distribution: Sequence[bool | None] | None = None,
) -> Profile:
    """The :class:`Profile` of answers (label and top probability each, and whether each image
    looked like the training data where that is known)."""
    n = len(labels)
    counts = {c: 0 for c in classes}
    for label in labels:
        if label in counts:
            counts[label] += 1
    edges = np.linspace(1.0 / max(len(classes), 1), 1.0, BINS + 1)
    conf = np.clip(np.asarray(confidences, np.float64), edges[0], 1.0)
    hist = np.histogram(conf, bins=edges)[0] if n else np.zeros(BINS)
    return Profile(
        classes=list(classes),
        n=n,
        class_share={c: counts[c] / n if n else 0.0 for c in classes},
        confidence_edges=[round(float(e), 6) for e in edges],
        confidence_share=[float(h) / n if n else 0.0 for h in hist],
        low_confidence_share=float(np.mean(conf < low_confidence)) if n else 0.0,
        ood_share=ood_share(in_distribution),
    )


def ood_share(in_distribution: Sequence[bool | None] | None) -> float | None:
    """The share flagged out of distribution among the answers where that is known (None: none known)."""
    known = [flag for flag in ([] if in_distribution is None else in_distribution) if flag is not None]
    return float(np.mean([not flag for flag in known])) if known else None


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two distributions over the same bins (shares summing to 1):
    sum((a - e) * ln(a / e)). Under 0.1 is usually read as stable, over 0.2 as a real shift."""
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    a = np.maximum(np.asarray(actual, np.float64), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class DriftReport:
    """A day against the reference, and whether it is flagged."""

    date: str
    source: str
    model_version: str | None
    n: int
    psi_class: float
    psi_confidence: float
    low_confidence_share: float
    reference_low_confidence_share: float
    class_share: dict[str, float]
    reference_class_share: dict[str, float]
    threshold: float
    flagged: bool
    reasons: list[str] = field(default_factory=list)
    ood_share: float | None = None
    reference_ood_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        lines = [
            f"drift {self.date} ({self.source}, model version {self.model_version}): {self.n} answers, "
            + ("FLAGGED: " + "; ".join(self.reasons) if self.flagged else "no drift"),
            f"  PSI of class shares      {self.psi_class:.4f}  (threshold {self.threshold:g})",
            f"  PSI of confidences       {self.psi_confidence:.4f}",
            f"  low-confidence share     {self.low_confidence_share:.3f}  "
            f"(reference {self.reference_low_confidence_share:.3f})",
        ]
        if self.ood_share is not None:
            reference = "unknown" if self.reference_ood_share is None else f"{self.reference_ood_share:.3f}"
            lines.append(f"  out-of-distribution share {self.ood_share:.3f}  (validation {reference})")
        shares = [
            [c, f"{share:.3f}", f"{self.reference_class_share.get(c, 0.0):.3f}"]
            for c, share in self.class_share.items()
        ]
        lines += ["", render(["class", "today", "reference"], shares)]
        return "\n".join(lines)


def compare(
    reference: Profile,
    today: Profile,
    settings: "MonitorSettings",
    *,
    date: str,
    source: str,
    version: str | None,
) -> DriftReport:
    """``today`` against ``reference`` (same classes and bins)."""
    classes = reference.classes
    psi_class = psi(
        [reference.class_share[c] for c in classes], [today.class_share.get(c, 0.0) for c in classes]
    )
    psi_conf = psi(reference.confidence_share, today.confidence_share)
    rise = today.low_confidence_share - reference.low_confidence_share
    reasons = []
    if psi_class > settings.psi_threshold:
        reasons.append(f"class shares moved (PSI {psi_class:.3f} > {settings.psi_threshold:g})")
    if psi_conf > settings.psi_threshold:
        reasons.append(f"confidences moved (PSI {psi_conf:.3f} > {settings.psi_threshold:g})")
    if rise > settings.max_low_confidence_increase:
        reasons.append(
            f"low-confidence answers rose by {rise:.3f} (> {settings.max_low_confidence_increase:g})"
        )
    if today.ood_share is not None and reference.ood_share is not None:
        ood_rise = today.ood_share - reference.ood_share
        if ood_rise > settings.max_ood_increase:
            reasons.append(
                f"out-of-distribution answers rose by {ood_rise:.3f} (> {settings.max_ood_increase:g})"
            )
    if today.n == 0:
        reasons = ["no answers that day"]
    return DriftReport(
        date=date,
        source=source,
        model_version=version,
        n=today.n,
        psi_class=round(psi_class, 6),
        psi_confidence=round(psi_conf, 6),
        low_confidence_share=round(today.low_confidence_share, 6),
        reference_low_confidence_share=round(reference.low_confidence_share, 6),
        class_share={c: round(today.class_share.get(c, 0.0), 6) for c in classes},
        reference_class_share={c: round(reference.class_share[c], 6) for c in classes},
        threshold=settings.psi_threshold,
        flagged=bool(reasons),
        reasons=reasons,
        ood_share=None if today.ood_share is None else round(today.ood_share, 6),
        reference_ood_share=None if reference.ood_share is None else round(reference.ood_share, 6),
    )


def plot(report: DriftReport, reference: Profile, today: Profile):
    """Class shares and confidence histograms, reference against the day (a matplotlib figure)."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    x = np.arange(len(reference.classes))
    left.bar(x - 0.2, [reference.class_share[c] for c in reference.classes], 0.4, label="reference")
    left.bar(x + 0.2, [today.class_share.get(c, 0.0) for c in reference.classes], 0.4, label=report.date)
    left.set_xticks(x, reference.classes, rotation=45, ha="right")
    left.set_title(f"class shares (PSI {report.psi_class:.3f})")
    left.legend()
    mids = (np.asarray(reference.confidence_edges[:-1]) + np.asarray(reference.confidence_edges[1:])) / 2
    width = (reference.confidence_edges[1] - reference.confidence_edges[0]) * 0.4
    right.bar(mids - width / 2, reference.confidence_share, width, label="reference")
    right.bar(mids + width / 2, today.confidence_share, width, label=report.date)
    right.set_title(f"confidence (PSI {report.psi_confidence:.3f})")
    right.legend()
    fig.tight_layout()
    return fig


def profile_from_probabilities(
    probs: np.ndarray,
    classes: Sequence[str],
    low_confidence: float,
    in_distribution: Sequence[bool] | None = None,
) -> Profile:
    """The profile of a model's answers given as class probabilities (N, C)."""
    best = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    return profile(
        [classes[i] for i in best],
        probs.max(axis=1) if len(probs) else [],
        classes,
        low_confidence,
        in_distribution,
    )


def from_json(data: dict[str, Any]) -> Profile:
    return Profile(**data)


def to_json(p: Profile) -> dict[str, Any]:
    return asdict(p)


# --- with the registry and storage -----------------------------------------------------------------


def reference_for(cfg: "Config", version: str) -> Profile:
    """The reference profile logged with the run of registered ``version``."""

    run_id = registry.version_run_id(cfg.tracking, version)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = registry.client(cfg.tracking).download_artifacts(run_id, REFERENCE_ARTIFACT, tmp)
            text = Path(path).read_text()
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        raise ModelError(
            f"version {version} (run {run_id}) has no reference profile ({REFERENCE_ARTIFACT}): "
            "it was trained before drift checks existed; retrain it to compare its traffic"
        ) from exc
    return from_json(json.loads(text))


@dataclass
class Answers:
    """A day's answers: label, top probability and (where known) the OOD flag each, and the most
    frequent model version."""

    labels: list[str]
    confidences: list[float]
    in_distribution: list[bool | None]
    version: str | None


def answers_of(table: "pa.Table", version_column: str) -> Answers:
    """The :class:`Answers` of a table of answers; rows with an error (a file scoring could not
    read) are left out."""

    if "error" in table.column_names:
        table = table.filter(pc.is_null(table["error"]))
    versions = [v for v in table[version_column].to_pylist() if v]
    flags = table["in_distribution"].to_pylist() if "in_distribution" in table.column_names else []
    return Answers(
        labels=[str(x) for x in table["label"].to_pylist()],
        confidences=[float(x) for x in table["probability"].to_pylist()],
        in_distribution=flags,
        # A reload mid-day leaves a few answers of the old version: the day is the majority's.
        version=max(set(versions), key=versions.count) if versions else None,
    )


def day_table(cfg: "Config", date: str, source: str) -> tuple["pa.Table", str]:
    """``date``'s answers from the prediction log (``predictions``) or the nightly scores
    (``scores``), and the name of their model-version column."""

    if source == "predictions":
        if not cfg.prediction_log.location:
            raise ConfigError("prediction_log.location is not set: there is no prediction log to read")
        return predlog.read(cfg.prediction_log.location, date), "version"
    if not cfg.score.output:
        raise ConfigError("score.output is not set: there are no nightly scores to read")
    return read_parquet_folder(storage.resolve(cfg.score.output).join(f"date={date}")), "model_version"


def read_parquet_folder(loc: "storage.Location") -> "pa.Table":
    """Every Parquet file below ``loc`` as one table (empty when there is none)."""

    tables = storage.read_parquet_tables(loc)
    return (
        pa.concat_tables(tables)
        if tables
        else pa.table({"label": [], "probability": [], "model_version": []})
    )


def assess(
    cfg: "Config", answers: Answers, *, date: str, source: str, run: "Run", version: str | None = None
) -> DriftReport:
    """The day's :class:`DriftReport` against its model's reference (of ``answers.version``, else
    ``version``, else the promoted one), logged to ``run`` (figures, report and plot) and to the
    ``hotdog_drift_*`` gauges."""

    version = answers.version or version or registry.alias_version(cfg.tracking)
    if version is None:
        raise ConfigError(f"no answers on {date} name a model version, and no model is promoted")
    reference = reference_for(cfg, str(version))
    today = profile(
        answers.labels,
        answers.confidences,
        reference.classes,
        cfg.monitor.low_confidence,
        answers.in_distribution,
    )
    report = compare(reference, today, cfg.monitor, date=date, source=source, version=str(version))
    run.log_metrics(
        {
            "drift_psi_class": report.psi_class,
            "drift_psi_confidence": report.psi_confidence,
            "drift_low_confidence_share": report.low_confidence_share,
            "drift_flagged": float(report.flagged),
            **({} if report.ood_share is None else {"drift_ood_share": report.ood_share}),
        }
    )
    run.log_dict(report.to_dict(), "drift/report.json")
    run.log_figure(plot(report, reference, today), "drift/profile.png")
    gauges = telemetry.job_gauges("hotdog_drift_psi", "hotdog_drift_flagged")
    if gauges:
        gauges["hotdog_drift_psi"].set(report.psi_class, tags={"measure": "class"})
        gauges["hotdog_drift_psi"].set(report.psi_confidence, tags={"measure": "confidence"})
        gauges["hotdog_drift_flagged"].set(float(report.flagged))
    (log.warning if report.flagged else log.info)("%s", report.format())
    return report


def check(cfg: "Config", date: str, source: str = "predictions") -> DriftReport:
    """``hotdog drift``: compare ``date``'s answers with their model's reference, in an MLflow run
    of its own."""

    table, version_column = day_table(cfg, date, source)
    with tracking.run(
        cfg.tracking, name=f"drift-{source}-{date}", tags={"kind": "drift", "date": date}
    ) as run:
        return assess(cfg, answers_of(table, version_column), date=date, source=source, run=run)
