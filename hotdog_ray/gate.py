"""The promotion gate: a registered candidate against the champion on the same test split, by
more than one number (``hotdog gate VERSION``).

Checks (thresholds in ``loop.*``), each with both values and pass or fail:

- **accuracy** and **balanced accuracy**, with bootstrap 95% intervals: the candidate may trail by
  at most ``loop.accuracy_margin``;
- **slice check**: no class's recall may drop by more than ``loop.recall_margin``;
- **invariance** (a behavioural test in the style of CheckList): the share of test images whose
  label stays the same under each of ``loop.invariances`` (a horizontal flip, a 15% brightness
  change, a 90% centre crop) may trail the champion's by at most ``loop.invariance_margin``;
- **live** (once ``loop.min_live_requests`` shadow requests exist): agreement with the champion
  (``rollout.min_agreement``), accuracy on labelled requests, and p99 latency under
  ``loop.max_p99_latency_ms``.

The decision and its reasons become tags of the candidate's registry version (``gate``,
``gate_reasons``, ``gate_champion``), which ``hotdog rollout report`` shows, and an MLflow run of its
own (``kind: gate``) holds the table and the report. The checks' arithmetic is pure (numpy).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from hotdog_ray import model_store, registry, rollout, tracking
from hotdog_ray.errors import ModelError
from hotdog_ray.evaluate import cached_split_for
from hotdog_ray.predict import Predictor
from hotdog_ray.tables import render

if TYPE_CHECKING:
    from hotdog_ray.bundle import ModelBundle
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

GATE_TAG, REASONS_TAG, CHAMPION_TAG = "gate", "gate_reasons", "gate_champion"


# --- pure ----------------------------------------------------------------------------------------


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, classes: int) -> float:
    """Mean recall over the classes present in ``y``."""
    recalls = per_class_recall(y, pred, classes)
    present = [r for r in recalls if r is not None]
    return float(np.mean(present)) if present else 0.0


def per_class_recall(y: np.ndarray, pred: np.ndarray, classes: int) -> list[float | None]:
    """Each class's recall (None for a class without test images)."""
    return [float(np.mean(pred[y == c] == c)) if np.any(y == c) else None for c in range(classes)]


def bootstrap_interval(
    y: np.ndarray,
    pred: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    samples: int,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic(y, pred)`` over resampled test images."""
    if len(y) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    values = [statistic(y[idx], pred[idx]) for idx in rng.integers(0, len(y), (samples, len(y)))]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def flip(images: np.ndarray) -> np.ndarray:
    return images[:, :, ::-1]


def brighter(images: np.ndarray, factor: float = 1.15) -> np.ndarray:
    return np.clip(images.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def crop(images: np.ndarray, keep: float = 0.9) -> np.ndarray:
    """The centre ``keep`` of each image, resized back to its size."""
    size = images.shape[1]
    side = max(1, round(size * keep))
    lo = (size - side) // 2
    return np.stack(
        [
            np.asarray(
                Image.fromarray(x[lo : lo + side, lo : lo + side]).resize((size, size), Image.BILINEAR)
            )
            for x in images
        ]
    )


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "horizontal flip": flip,
    "brightness": brighter,
    "crop": crop,
}


@dataclass
class Check:
    """One check: the candidate's figure beside the champion's, and whether it passed."""

    name: str
    candidate: float | None
    champion: float | None
    passed: bool
    detail: str = ""

    def row(self) -> list[str | None]:
        """The check as a row of the gate's table: result, name, both figures, detail."""

        def fmt(v: float | None) -> str | None:
            return None if v is None else f"{v:.4f}"

        return [
            "pass" if self.passed else "FAIL",
            self.name,
            fmt(self.candidate),
            fmt(self.champion),
            self.detail,
        ]


def not_worse(name: str, candidate: float, champion: float, margin: float, detail: str = "") -> Check:
    """Passes when ``candidate`` trails ``champion`` by at most ``margin`` (pure)."""
    return Check(name, candidate, champion, candidate >= champion - margin - 1e-12, detail)


@dataclass
class Answers:
    """A model's labels on the test split, as they are and under each perturbation."""

    labels: np.ndarray
    perturbed: dict[str, np.ndarray] = field(default_factory=dict)


def offline_checks(
    y: np.ndarray, candidate: Answers, champion: Answers, classes: list[str], settings: Any
) -> list[Check]:
    """The test-split checks of the module docstring (pure)."""
    k, n = len(classes), settings.bootstrap_samples
    out = []
    for name, stat in (
        ("accuracy", lambda t, p: float(np.mean(t == p))),
        ("balanced accuracy", lambda t, p: balanced_accuracy(t, p, k)),
    ):
        c, h = stat(y, candidate.labels), stat(y, champion.labels)
        ci_c = bootstrap_interval(y, candidate.labels, stat, n)
        ci_h = bootstrap_interval(y, champion.labels, stat, n)
        detail = f"95% CI {ci_c[0]:.3f}-{ci_c[1]:.3f} vs {ci_h[0]:.3f}-{ci_h[1]:.3f}"
        out.append(not_worse(name, c, h, settings.accuracy_margin, detail))
    for cls, c, h in zip(
        classes, per_class_recall(y, candidate.labels, k), per_class_recall(y, champion.labels, k)
    ):
        if c is not None and h is not None:
            out.append(not_worse(f"recall of {cls}", c, h, settings.recall_margin, "slice check"))
    for name in settings.invariances:
        c = float(np.mean(candidate.perturbed[name] == candidate.labels))
        h = float(np.mean(champion.perturbed[name] == champion.labels))
        out.append(not_worse(f"same label under {name}", c, h, settings.invariance_margin, "invariance"))
    return out


def live_checks(cfg: "Config", stats: rollout.RolloutStats, accuracy: dict[str, Any] | None) -> list[Check]:
    """The live checks from a shadow rollout's figures; none below ``loop.min_live_requests``."""
    g = cfg.loop
    if g.min_live_requests == 0 or stats.shadowed < g.min_live_requests:
        return []
    out = [
        Check(
            "agreement with the champion (live)",
            stats.agreement,
            None,
            (stats.agreement or 0.0) >= cfg.rollout.min_agreement,
            f"{stats.shadowed} shadow requests, rollout.min_agreement {cfg.rollout.min_agreement}",
        )
    ]
    if accuracy and accuracy["challenger"]["labelled"] and accuracy["champion"]["labelled"]:
        c, h = accuracy["challenger"]["accuracy"], accuracy["champion"]["accuracy"]
        out.append(not_worse("accuracy on labelled requests (live)", c, h, g.accuracy_margin))
    latencies = stats.latency_ms.get("challenger", [])
    if g.max_p99_latency_ms is not None and latencies:
        p99 = float(np.percentile(latencies, 99))
        out.append(
            Check(
                "p99 latency ms (live)",
                p99,
                None,
                p99 <= g.max_p99_latency_ms,
                f"budget {g.max_p99_latency_ms}",
            )
        )
    return out


@dataclass
class GateReport:
    """Every check of a candidate against the champion, and the decision."""

    candidate: str
    champion: str | None
    checks: list[Check]
    live_requests: int = 0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def reason(self) -> str:
        if self.champion is None:
            return "no champion to compare with"
        return "every check passed" if self.passed else "failed: " + ", ".join(self.failed)

    def format(self) -> str:
        head = f"gate: version {self.candidate} against champion version {self.champion}: "
        lines = [
            head + ("PASS" if self.passed else "FAIL") + f" ({self.reason()})",
            render(["", "check", "candidate", "champion", "detail"], (c.row() for c in self.checks)),
        ]
        if not any("(live)" in c.name for c in self.checks):
            lines.append(
                f"  live checks not run: {self.live_requests} shadow requests (loop.min_live_requests)"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "reason": self.reason()}


# --- with the registry ---------------------------------------------------------------------------


def answers_of(cfg: "Config", bundle: "ModelBundle", root: str | None) -> tuple[np.ndarray, Answers]:
    """(true labels, the model's answers) on the test split, at the model's own input size."""
    split = cached_split_for(cfg, bundle, root=root)
    predictor = Predictor(bundle, runtime=cfg.predict.runtime)
    images = np.concatenate([split.read_images(s) for s in split.shards])
    y = np.concatenate([split.read_index(s).column("label").to_numpy() for s in split.shards]).astype(
        np.int64
    )

    def labels(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                predictor.predict_arrays(x[i : i + 256]).probabilities.argmax(axis=1)
                for i in range(0, len(x), 256)
            ]
        )

    changed = {name: labels(PERTURBATIONS[name](images)) for name in cfg.loop.invariances}
    return y, Answers(labels(images), changed)


def run_gate(cfg: "Config", version: str, *, data_root: str | None = None) -> GateReport:
    """``hotdog gate VERSION``: the checks against the champion, recorded on the version and in MLflow."""
    t = cfg.tracking
    champion_version = registry.alias_version(t)
    candidate = model_store.load_model(t, f"models:/{t.registered_model}/{version}")
    if champion_version is None or champion_version == version:
        report = GateReport(candidate=version, champion=None, checks=[])
        return _record(cfg, report)
    champion = model_store.load_model(t, f"models:/{t.registered_model}/{champion_version}")
    if champion.classes != candidate.classes:
        raise ModelError(
            f"version {version} predicts {candidate.classes}, champion {champion_version} {champion.classes}: "
            "the gate compares models of the same classes"
        )
    y, theirs = answers_of(cfg, candidate, data_root)
    y_champion, ours = answers_of(cfg, champion, data_root)
    if not np.array_equal(y, y_champion):
        raise ModelError("the champion and the candidate read different test splits")
    checks = offline_checks(y, theirs, ours, candidate.classes, cfg.loop)
    stats = rollout.report(cfg, champion_version, version)
    accuracy = None
    if cfg.prediction_log.location and stats.shadowed >= max(1, cfg.loop.min_live_requests):
        _, accuracy = rollout.from_prediction_log(cfg, champion_version, version)
    checks += live_checks(cfg, stats, accuracy)
    return _record(cfg, GateReport(version, champion_version, checks, live_requests=stats.shadowed))


def _record(cfg: "Config", report: GateReport) -> GateReport:
    t = cfg.tracking
    tags = {GATE_TAG: "passed" if report.passed else "failed", REASONS_TAG: report.reason()[:5000]}
    tags[CHAMPION_TAG] = str(report.champion)
    mlflow = registry.client(t)
    for key, value in tags.items():
        mlflow.set_model_version_tag(t.registered_model, report.candidate, key, value)
    with tracking.run(
        t, name=f"gate-{report.candidate}", tags={"kind": "gate", "version": report.candidate}
    ) as run:
        run.log_text(report.format(), "gate/report.txt")
        run.log_dict(report.to_dict(), "gate/report.json")
        run.log_metrics(
            {"gate_passed": float(report.passed), "gate_failed_checks": float(len(report.failed))}
        )
        run.set_tags(tags)
    (log.info if report.passed else log.warning)("%s", report.format())
    return report


def recorded(cfg: "Config", version: str) -> dict[str, str]:
    """The gate's tags on ``version`` (empty when it never ran)."""
    t = cfg.tracking
    tags = registry.client(t).get_model_version(t.registered_model, version).tags
    return {k: tags[k] for k in (GATE_TAG, REASONS_TAG, CHAMPION_TAG) if k in tags}
