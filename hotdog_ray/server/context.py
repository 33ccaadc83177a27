"""What the HTTP routes reach: one typed object per app, in place of loose ``app.state`` attributes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
from starlette.requests import Request

from hotdog_ray.config import DataSettings, PredictionLogSettings, ServeSettings
from hotdog_ray.predict import Predictor, Scores
from hotdog_ray.predlog import FEEDBACK, Entry, FeedbackLog, PredictionLog
from hotdog_ray.server.keys import api_keys
from hotdog_ray.server.service import ModelService
from hotdog_ray.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Shadow:
    """A request whose image the challenger also scores, off the response path (shadow rollout)."""

    challenger: Predictor
    request_id: str
    image: bytes
    started: float = field(default_factory=time.perf_counter)


# Runs the model on one encoded image: its probabilities, or raises ImageError; with a Shadow, the
# challenger also scores the image later.
Infer = Callable[[Predictor, bytes, "Shadow | None"], Awaitable[Scores]]


def model_of(predictor: Predictor) -> dict[str, str | None]:
    info = predictor.info
    return {"name": info["name"], "version": info["version"]}


@dataclass(kw_only=True)
class ServerContext:
    """One app's model service, limits, inference path, telemetry and logs."""

    service: ModelService
    settings: ServeSettings
    max_pixels: int  # the image guards (data.max_image_pixels, data.min_image_side)
    min_side: int
    infer: Infer
    telemetry: Telemetry
    prediction_log: PredictionLog | None = None
    feedback_log: FeedbackLog | None = None
    api_keys: list[bytes] | None = None

    @classmethod
    def create(
        cls,
        service: ModelService,
        settings: ServeSettings,
        answers: PredictionLogSettings,
        images: DataSettings,
        infer: Infer,
    ) -> "ServerContext":
        """The context of a server process: its prediction and feedback logs when
        ``prediction_log.location`` is set, and the API keys ``serve.api_keys_env`` names."""
        telemetry = service.telemetry
        plog = prediction_log(answers, telemetry)
        feedback = None
        if plog is not None:
            feedback = FeedbackLog(
                plog.location.join(FEEDBACK).uri,
                flush_interval_s=answers.flush_interval_s,
                max_rows=answers.queue_rows,
            )
        keys = api_keys(settings.api_keys_env)
        if keys is None:
            log.warning(
                "serve.api_keys_env is not set: the prediction endpoints are open to anyone who reaches them"
            )
        return cls(
            service=service,
            settings=settings,
            max_pixels=images.max_image_pixels,
            min_side=images.min_image_side,
            infer=infer,
            telemetry=telemetry,
            prediction_log=plog,
            feedback_log=feedback,
            api_keys=keys,
        )

    async def close(self) -> None:
        """Writes the rows still queued, before the process goes."""
        for rows in (self.prediction_log, self.feedback_log):
            if rows is not None:
                await asyncio.to_thread(rows.close)

    def shadow_answered(
        self, shadow: Shadow, theirs: np.ndarray, ours: np.ndarray, champion: Predictor
    ) -> tuple[str, bool]:
        """Books the challenger's probabilities ``theirs`` beside the champion's ``ours``: rollout
        figures, and the challenger's row in the prediction log under the same request id. Returns
        the challenger's label and whether both agreed."""
        challenger = shadow.challenger
        label = challenger.classes[int(np.argmax(theirs))]
        agreed = label == champion.classes[int(np.argmax(ours))]
        latency_ms = 1000 * (time.perf_counter() - shadow.started)
        rollout = self.service.rollout
        rollout.shadowed(agreed, latency_ms, float(theirs.max()))
        if self.prediction_log is not None:
            model = model_of(challenger)
            self.prediction_log.offer(
                Entry(
                    request_id=shadow.request_id,
                    endpoint="/predict",
                    model=model["name"],
                    version=model["version"],
                    served_by="shadow",
                    label=label,
                    probabilities=dict(zip(challenger.classes, map(float, theirs))),
                    latency_ms=latency_ms,
                    image=shadow.image,
                )
            )
        if rollout.stats.shadowed % 500 == 0:
            log.info(
                "shadow %s against %s: %s",
                self.service.challenger_key,
                self.service.key,
                rollout.stats.summary(),
            )
        return label, agreed


def prediction_log(cfg: PredictionLogSettings, telemetry: Telemetry) -> PredictionLog | None:
    """The server process's prediction log (``prediction_log.location``), or None when unset."""
    if not cfg.location:
        return None
    return PredictionLog(
        cfg.location,
        sample_rate=cfg.sample_rate,
        flush_interval_s=cfg.flush_interval_s,
        max_rows=cfg.queue_rows,
        log_images=cfg.images,
        on_drop=lambda n: telemetry.log_rows("dropped", n),
        on_write=lambda n: telemetry.log_rows("written", n),
    )


def context_of(request: Request) -> ServerContext:
    """The app's context (``create_api`` puts it on the app's state)."""
    return request.app.state.context
