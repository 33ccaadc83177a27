"""Rollouts: what a challenger did on live traffic beside the champion, and the gate before it takes over.

Each Serve replica keeps :class:`RolloutStats` for its champion-challenger pair (``serve.rollout``)
and writes them every ``rollout.flush_interval_s`` to ``rollout.store`` (a local folder or
``s3://``), one JSON file per replica under ``<model>/<champion>-vs-<challenger>/``.
:func:`report` adds up every replica's file (``hotdog rollout report``), and :func:`gate` is what
``hotdog promote --force`` checks against ``rollout.min_requests`` and ``rollout.min_agreement``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

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


def pair_name(champion: str, challenger: str) -> str:
    """The folder of one champion-challenger pair, from their ``models:/<name>/<version>`` keys."""
    return f"{champion.rsplit('/', 1)[-1]}-vs-{challenger.rsplit('/', 1)[-1]}"


def write(cfg: "Config", champion: str, challenger: str, figures: bytes) -> None:
    """This replica's figures (:meth:`RolloutStats.to_json`) for the pair, replacing what it wrote before."""
    from hotdog_ray import storage

    where = storage.resolve(cfg.rollout.store).join(
        cfg.tracking.registered_model, pair_name(champion, challenger)
    )
    storage.write_bytes(where.fs, f"{where.path}/{socket.gethostname()}-{os.getpid()}.json", figures)


def report(cfg: "Config", champion_version: str, challenger_version: str) -> RolloutStats:
    """Every replica's figures for champion and challenger versions, added up."""
    from hotdog_ray import storage

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
