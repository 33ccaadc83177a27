"""Shadow work: the challenger scores the champion's decoded images in batches, after the answers
went out, one batch at a time per replica."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hotdog_ray.predict import Predictor
from hotdog_ray.server.batching import MicroBatcher
from hotdog_ray.server.context import ServerContext, Shadow

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ShadowJob:
    """One queued image: the champion that answered, the request's shadow, the decoded image and
    the champion's probabilities."""

    champion: Predictor
    shadow: Shadow
    image: np.ndarray
    answer: np.ndarray


class ShadowQueue:
    """Queued shadow work, drained in batches of up to ``max_size`` images (queued while the
    previous one ran). Under load the challenger's batches fill (its weights are read once a batch,
    not once an image) and its passes do not crowd the champion's on the cores; at low load each
    batch runs as soon as its answers went out."""

    def __init__(self, ctx: ServerContext, max_size: int) -> None:
        self.ctx = ctx
        self._queue = MicroBatcher(self.run, max_size)

    def offer(self, job: ShadowJob) -> None:
        self._queue.offer(job)

    async def drained(self) -> None:
        await self._queue.drained()

    async def run(self, jobs: list[ShadowJob]) -> list[None]:
        """One batch: a reload may have swapped the champion or the challenger between two
        requests, so each champion-challenger pair scores its own images."""
        pairs: dict[tuple[int, int], list[ShadowJob]] = {}
        for job in jobs:
            pairs.setdefault((id(job.champion), id(job.shadow.challenger)), []).append(job)
        for group in pairs.values():
            await self.score(group)
        return [None] * len(jobs)

    async def score(self, jobs: list[ShadowJob]) -> None:
        """One challenger on one champion's decoded images, as one batch."""
        champion, challenger = jobs[0].champion, jobs[0].shadow.challenger
        try:
            rows = await asyncio.to_thread(challenger_pass, challenger, champion, [j.image for j in jobs])
        except Exception as exc:  # noqa: BLE001 - the shadow must never disturb serving
            log.warning("shadow batch failed: %s", exc)
            return
        answers = [self.ctx.shadow_answered(j.shadow, row, j.answer, champion) for j, row in zip(jobs, rows)]
        # One metric update per distinct value and batch, not two per answer.
        for agreed, n in Counter(agreed for _, agreed in answers).items():
            self.ctx.telemetry.shadow(agreed, n)
        for label, n in Counter(label for label, _ in answers).items():
            self.ctx.telemetry.prediction(label, "shadow", n)


def challenger_pass(challenger: Predictor, champion: Predictor, images: list[np.ndarray]) -> np.ndarray:
    """The challenger's probabilities for what the champion saw, resized to its input if it differs."""
    if challenger.image_size != champion.image_size:
        size = (challenger.image_size, challenger.image_size)
        images = [np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR)) for x in images]
    return challenger.predict_arrays(np.stack(images)).probabilities
