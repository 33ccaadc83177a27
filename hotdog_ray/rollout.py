"""Rollouts: what a challenger did on live traffic beside the champion, and the gate before it takes over.

Each Serve replica's :class:`LiveRollout` picks who answers a request and keeps
:class:`RolloutStats` for its champion-challenger pair (``rollout.mode``); the replica writes them every ``rollout.flush_interval_s`` to ``rollout.store`` (a local folder or
``s3://``), one JSON file per replica under ``<model>/<champion>-vs-<challenger>/``.
:func:`report` adds up every replica's file (``hotdog rollout report``), and :func:`gate` is what
``hotdog promote --force`` checks against ``rollout.min_requests`` and ``rollout.min_agreement``.
With a prediction log, :func:`from_prediction_log` gives the same figures for a period (the log holds
the champion's, the canary's and the shadow's answers under one request id) and each version's
accuracy on the requests that got a true label through ``POST /feedback``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from hotdog_ray import predlog, storage
from hotdog_ray.errors import ConfigError

if TYPE_CHECKING:
    from hotdog_ray.config import Config

log = logging.getLogger(__name__)

ROLES = ("champion", "challenger")


def _samples() -> dict[str, list[float]]:
    return {role: [] for role in ROLES}


@dataclass
class RolloutStats:
    """A champion against a challenger, as one replica (or, added up, all of them) saw it."""

    served: int = 0  # requests the champion answered
    canary: int = 0  # requests the challenger answered (canary mode)
    shadowed: int = 0  # champion answers the challenger also scored (shadow mode)
    agreed: int = 0  # ... with the same label
    latency_ms: dict[str, list[float]] = field(default_factory=_samples)
    confidence: dict[str, list[float]] = field(default_factory=_samples)

    KEEP = 2000  # most recent samples per figure: memory stays bounded on a long rollout

    def sample(self, role: str, latency_ms: float, confidence: float) -> None:
        for figures, value in ((self.latency_ms, latency_ms), (self.confidence, confidence)):
            values = figures[role]
            values.append(round(value, 4))
            if len(values) > self.KEEP:
                del values[: len(values) - self.KEEP]

    def add(self, other: "RolloutStats") -> None:
        self.served, self.canary = self.served + other.served, self.canary + other.canary
        self.shadowed, self.agreed = self.shadowed + other.shadowed, self.agreed + other.agreed
        for role in ROLES:
            self.latency_ms[role] += other.latency_ms.get(role, [])
            self.confidence[role] += other.confidence.get(role, [])

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.shadowed if self.shadowed else None

    def summary(self) -> dict[str, Any]:
        def median(values: list[float]) -> float | None:
            return float(np.median(values)) if values else None

        return {
            "requests": self.served + self.canary,
            "served_by_champion": self.served,
            "served_by_challenger": self.canary,
            "shadowed": self.shadowed,
            "agreement": self.agreement,
            "p50_latency_ms": {r: median(v) for r, v in self.latency_ms.items()},
            "median_confidence": {r: median(v) for r, v in self.confidence.items()},
        }

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "RolloutStats":
        raw = json.loads(data)
        return cls(
            **{k: raw[k] for k in ("served", "canary", "shadowed", "agreed", "latency_ms", "confidence")}
        )


class LiveRollout:
    """A replica's rollout (``rollout.mode``): who answers each request, and the figures of the
    champion-challenger pair it serves, started afresh whenever either model changes."""

    def __init__(self, mode: str, canary_fraction: float, draw: Callable[[], float] = random.random) -> None:
        self.mode, self.canary_fraction, self._draw = mode, canary_fraction, draw
        self.stats = RolloutStats()

    def restart(self) -> None:
        """A new champion or challenger: a new pair to compare."""
        self.stats = RolloutStats()

    def choose(self, has_challenger: bool) -> str | None:
        """The role that answers the next request; None when no rollout runs (off, or no challenger)."""
        if self.mode == "off" or not has_challenger:
            return None
        if self.mode == "canary" and self._draw() < self.canary_fraction:
            return "challenger"
        return "champion"

    def shadows(self, role: str) -> bool:
        """Whether the challenger also scores what ``role`` answered."""
        return self.mode == "shadow" and role == "champion"

    def answered(self, role: str, latency_ms: float, confidence: float) -> None:
        self.stats.sample(role, latency_ms, confidence)
        if role == "challenger":
            self.stats.canary += 1
        else:
            self.stats.served += 1

    def shadowed(self, agreed: bool, latency_ms: float, confidence: float) -> None:
        """The challenger's answer to a request the champion answered."""
        self.stats.sample("challenger", latency_ms, confidence)
        self.stats.shadowed += 1
        self.stats.agreed += agreed

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, **self.stats.summary()}


def pair_name(champion: str, challenger: str) -> str:
    """The folder of one champion-challenger pair, from their ``models:/<name>/<version>`` keys."""
    return f"{champion.rsplit('/', 1)[-1]}-vs-{challenger.rsplit('/', 1)[-1]}"


def write(cfg: "Config", champion: str, challenger: str, figures: bytes) -> None:
    """This replica's figures (:meth:`RolloutStats.to_json`) for the pair, replacing what it wrote before."""

    where = storage.resolve(cfg.rollout.store).join(
        cfg.tracking.registered_model, pair_name(champion, challenger)
    )
    storage.write_bytes(where.fs, f"{where.path}/{socket.gethostname()}-{os.getpid()}.json", figures)


def report(cfg: "Config", champion_version: str, challenger_version: str) -> RolloutStats:
    """Every replica's figures for champion and challenger versions, added up."""

    where = storage.resolve(cfg.rollout.store).join(
        cfg.tracking.registered_model, f"{champion_version}-vs-{challenger_version}"
    )
    total = RolloutStats()
    for path in storage.list_files(where):
        if path.endswith(".json"):
            total.add(RolloutStats.from_json(storage.read_bytes(where.fs, path)))
    return total


def gate(cfg: "Config", stats: RolloutStats) -> tuple[bool, str]:
    """Whether the shadow figures let the challenger take over (pure), and why."""
    r = cfg.rollout
    if stats.shadowed < r.min_requests:
        return False, f"only {stats.shadowed} shadow requests, rollout.min_requests is {r.min_requests}"
    if r.min_agreement > 0 and (stats.agreement or 0.0) < r.min_agreement:
        return False, f"agreement {stats.agreement or 0:.3f} is below rollout.min_agreement {r.min_agreement}"
    return True, f"{stats.shadowed} shadow requests, agreement {stats.agreement or 0:.3f}"


def _challenger_role(row: dict[str, Any]) -> bool:
    return row["served_by"] in ("challenger", "shadow")


def stats_from_log(rows: list[dict[str, Any]], champion: str, challenger: str) -> RolloutStats:
    """The pair's figures from prediction log rows (pure): the champion's answers, the challenger's
    canary answers and its shadow answers, agreement over the requests both answered."""
    stats = RolloutStats()
    champion_label: dict[str, str] = {}
    shadow_label: dict[str, str] = {}
    for row in rows:
        version = str(row["version"])
        if row["served_by"] == "champion" and version == champion:
            stats.served += 1
            champion_label[row["request_id"]] = row["label"]
            stats.sample("champion", row["latency_ms"], row["probability"])
        elif _challenger_role(row) and version == challenger:
            if row["served_by"] == "challenger":
                stats.canary += 1
            else:
                shadow_label[row["request_id"]] = row["label"]
            stats.sample("challenger", row["latency_ms"], row["probability"])
    both = champion_label.keys() & shadow_label.keys()
    stats.shadowed = len(both)
    stats.agreed = sum(champion_label[r] == shadow_label[r] for r in both)
    return stats


def accuracy(
    rows: list[dict[str, Any]], labels: dict[str, str], champion: str, challenger: str
) -> dict[str, dict[str, Any]]:
    """Each role's accuracy on the requests that got feedback (``POST /feedback``), pure: the
    champion's answers, and the challenger's canary and shadow answers."""
    out = {role: {"labelled": 0, "correct": 0, "accuracy": None} for role in ROLES}
    for row in rows:
        truth = labels.get(row["request_id"])
        version = str(row["version"])
        if truth is None:
            continue
        if row["served_by"] == "champion" and version == champion:
            role = "champion"
        elif _challenger_role(row) and version == challenger:
            role = "challenger"
        else:
            continue
        out[role]["labelled"] += 1
        out[role]["correct"] += row["label"] == truth
    for figures in out.values():
        if figures["labelled"]:
            figures["accuracy"] = figures["correct"] / figures["labelled"]
    return out


def from_prediction_log(
    cfg: "Config", champion: str, challenger: str, since: str | None = None
) -> tuple[RolloutStats, dict[str, dict[str, Any]]]:
    """The pair's figures and accuracies from the prediction log (``prediction_log.location``) and its feedback (the days
    from ``since``, YYYY-MM-DD, or all)."""

    if not cfg.prediction_log.location:
        raise ConfigError(
            "prediction_log.location is not set: figures by date and accuracy need the prediction log"
        )
    rows = predlog.read(cfg.prediction_log.location, since=since).to_pylist()
    feedback_at = storage.resolve(cfg.prediction_log.location).join(predlog.FEEDBACK).uri
    feedback = predlog.read(feedback_at, since=since, schema=predlog.FEEDBACK_SCHEMA).to_pylist()
    labels = {f["request_id"]: f["label"] for f in sorted(feedback, key=lambda f: f["time"])}  # latest wins
    return stats_from_log(rows, champion, challenger), accuracy(rows, labels, champion, challenger)
