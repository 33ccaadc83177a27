"""The model one server process answers with (the champion, and a rollout's challenger), and the
switch to a newer one: hot reload. Knows nothing of HTTP or Ray Serve."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from hotdog_ray import registry
from hotdog_ray.config import Config
from hotdog_ray.predict import Predictor, cpu_threads
from hotdog_ray.rollout import LiveRollout
from hotdog_ray.telemetry import Telemetry, serving_telemetry

log = logging.getLogger(__name__)


class ModelService:
    """The model one server process answers with, and the switch to a newer one."""

    def __init__(self, cfg: Config, ref: str | None = None) -> None:
        self.cfg = cfg
        self.ref = ref or cfg.serve.model_uri
        self.predictor: Predictor | None = None
        self.key: str | None = None  # the concrete model loaded (a version, a run, a folder)
        self.last_error: str | None = None
        self.run_scores: dict[str, float] = {}  # the serving model's training and test scores
        self.challenger: Predictor | None = None  # rollout.mode's model, when the alias is set
        self.challenger_key: str | None = None
        self.rollout = LiveRollout(cfg.rollout.mode, cfg.rollout.canary_fraction)
        self.telemetry: Telemetry = serving_telemetry()
        self._lock = threading.Lock()

    def _resolve(self) -> str:
        """The concrete model the reference names now: an alias resolves to its current version."""
        return registry.resolve_model_ref(
            self.cfg.tracking, self.ref or registry.default_model_ref(self.cfg.tracking)
        )

    def refresh(self) -> bool:
        """Load the model the reference names now, if it is not the one loaded; True if it switched.

        A failure keeps the old model serving (and is logged, and shown by /readyz when no model
        was ever loaded).
        """
        with self._lock:  # one load at a time; requests keep using self.predictor meanwhile
            if self.cfg.rollout.mode != "off":
                self._refresh_challenger()
            try:
                key = self._resolve()
                if key == self.key:
                    return False
                predictor = self._load(key)
                run_id = predictor.bundle.meta.get("run_id")
                scores = registry.run_metrics(self.cfg.tracking, run_id) if run_id else {}
            except Exception as exc:  # noqa: BLE001 - whatever fails (store, download, weights), the old model keeps serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("model reload failed, still serving %s: %s", self.key, self.last_error)
                return False
            old, old_predictor = self.key, self.predictor
            self.predictor, self.key, self.run_scores, self.last_error = predictor, key, scores, None
            self.rollout.restart()  # a new champion: a new pair to compare
        self._swapped("champion", old_predictor, predictor)
        log.info("now serving %s (was %s)", key, old)
        return True

    def _swapped(self, role: str, old: Predictor | None, new: Predictor | None) -> None:
        """The model info gauge follows what is loaded; a load after the first counts as a reload."""
        if old is not None:
            self.telemetry.reload(role)
            info = old.info
            self.telemetry.model(info["name"], info["version"], role, loaded=False)
        if new is not None:
            info = new.info
            self.telemetry.model(info["name"], info["version"], role, loaded=True)

    def _load(self, key: str) -> Predictor:
        s = self.cfg.serve
        return Predictor.from_config(
            self.cfg,
            key,
            max_pixels=self.cfg.data.max_image_pixels,
            min_side=self.cfg.data.min_image_side,
            top_k=s.top_k,
            device="cuda" if s.gpus_per_replica > 0 else "cpu",
            threads=cpu_threads(s.cpus_per_replica),
        )

    def _refresh_challenger(self) -> None:
        """Load the version the challenger alias names now (None when it is unset), beside the champion."""
        t = self.cfg.tracking
        version = registry.alias_version(t, t.challenger_alias)
        key = None if version is None else f"models:/{t.registered_model}/{version}"
        if key == self.challenger_key:
            return
        try:
            challenger = None if key is None else self._load(key)
        except Exception as exc:  # noqa: BLE001 - a challenger that fails to load is left out, not served
            log.error("challenger %s failed to load, rollout paused: %s", key, exc)
            return
        old, self.challenger, self.challenger_key = self.challenger, challenger, key
        self._swapped("challenger", old, challenger)
        self.rollout.restart()  # figures are per champion-challenger pair
        log.info("rollout %s: challenger %s", self.cfg.rollout.mode, key)

    def info(self) -> dict[str, Any]:
        p = self.predictor
        if p is None:
            return {"loaded": False, "error": self.last_error}
        # pid: which server process answered (a reload keeps it; a restarted replica does not)
        return {**p.info, "loaded": True, "key": self.key, "metrics": self.run_scores, "pid": os.getpid()}


# --------------------------------------------------------------------------------------------
# HTTP
