"""The Ray Serve replica: the model service, its reload poller, the batching queue in front of the
model, the shadow queue behind it, and the rollout figures it writes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from hotdog_ray import rollout
from hotdog_ray.config import from_dict
from hotdog_ray.errors import ImageError
from hotdog_ray.predict import Predictor, Scores
from hotdog_ray.server.app import create_api, one_result
from hotdog_ray.server.batching import MicroBatcher, PassRunner
from hotdog_ray.server.context import ServerContext, Shadow
from hotdog_ray.server.service import ModelService
from hotdog_ray.server.shadow import ShadowJob, ShadowQueue

log = logging.getLogger(__name__)


# The app needs this replica's model service and batching queue, which exist only once __init__
# ran, so the app is built per replica: Ray 2.60's `serve.ingress()` documents this deferred form
# (no app given; the class defines __serve_build_asgi_app__, called after the constructor).
@serve.ingress()
class HotdogReplica:
    """One Serve replica of ``hotdog serve``."""

    async def __init__(self, raw_config: dict[str, Any]) -> None:
        self.cfg = from_dict(raw_config)
        s = self.cfg.serve
        self._batcher = MicroBatcher(self.infer_batch, s.max_batch_size, s.batch_wait_timeout_s)
        self._passes = PassRunner()
        self.service = ModelService(self.cfg)
        self.context = ServerContext.create(
            self.service, s, self.cfg.prediction_log, self.cfg.data, self.infer
        )
        self._shadows = ShadowQueue(self.context, s.max_batch_size)
        await asyncio.to_thread(self.service.refresh)
        self._user_config: dict[str, Any] | None = None
        if s.reload_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())
        if self.cfg.rollout.mode != "off":
            self._flusher = asyncio.create_task(self._flush_rollout())

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve runs the app's lifespan: its shutdown writes the prediction log's last rows.
        return create_api(self.context)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serve.reload_interval_s)
            await asyncio.to_thread(self.service.refresh)

    async def _flush_rollout(self) -> None:
        """Write this replica's rollout figures where ``hotdog rollout report`` adds them up."""
        while True:
            await asyncio.sleep(self.cfg.rollout.flush_interval_s)
            await self._write_rollout()

    async def _write_rollout(self) -> None:
        svc = self.service
        if svc.key and svc.challenger_key:
            figures = svc.rollout.stats.to_json()  # on the loop: nothing appends meanwhile
            try:
                await asyncio.to_thread(rollout.write, self.cfg, svc.key, svc.challenger_key, figures)
            except Exception as exc:  # noqa: BLE001 - figures must never stop the replica
                log.warning("could not write rollout figures to %s: %s", self.cfg.rollout.store, exc)

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (after the app's lifespan): the shadow work still
        queued runs, and the rollout figures gathered since the last flush are written, not lost."""
        cfg = getattr(self, "cfg", None)  # None when __init__ failed before setting it
        if cfg is not None and cfg.rollout.mode != "off":
            await self._shadows.drained()
            await self._write_rollout()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this after start and on every ``user_config`` change: a change reloads now."""
        user_config = dict(user_config or {})
        changed = self._user_config is not None and user_config != self._user_config
        self._user_config = user_config
        if user_config.get("model_uri") and user_config["model_uri"] != self.service.ref:
            self.service.ref, changed = user_config["model_uri"], True
        if changed:
            await asyncio.to_thread(self.service.refresh)

    async def infer(self, predictor: Predictor, data: bytes, shadow: Shadow | None = None) -> Scores:
        return one_result(await self._batcher((predictor, data, shadow)))

    # Decoding and the forward pass run together, one worker thread hop per batch (none for a cheap
    # lone image, see PassRunner): a hop per request for decoding cost as much as decoding a small photo.
    async def infer_batch(
        self, items: list[tuple[Predictor, bytes, Shadow | None]]
    ) -> list[Scores | ImageError]:
        self.service.telemetry.batch(len(items))
        # A batch may straddle a reload: each image runs on the model its request started with.
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (predictor, _, _) in enumerate(items):
            groups.setdefault(id(predictor), []).append(i)
        for idx in groups.values():
            predictor = items[idx[0]][0]
            # A shadowed image stays in the thread: its challenger's pass follows in another thread,
            # and with the loop also running passes shadow throughput fell (bench/RESULTS.md).
            lone = len(items) == 1 and items[0][2] is None
            results, inputs = await self._passes(
                predictor.decode_and_predict, [items[i][1] for i in idx], lone=lone
            )
            for i, x, result in zip(idx, inputs, results):
                out[i] = result
                shadow = items[i][2]
                if shadow is not None and x is not None:
                    self._shadows.offer(
                        ShadowJob(champion=predictor, shadow=shadow, image=x, answer=result.probabilities)
                    )
        return out
