"""The HTTP routes: the web page, health, the model, predictions (with the rollout's choice of
model), explanations and feedback. They reach the model through the app's :class:`ServerContext`,
so the same routes run on Ray Serve and in one plain uvicorn process (``bench/serve.py``'s baseline)."""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from hotdog_ray.errors import ImageError
from hotdog_ray.predict import Predictor
from hotdog_ray.predlog import Entry, Feedback
from hotdog_ray.server.context import ServerContext, Shadow, context_of, model_of
from hotdog_ray.server.http import (
    REQUEST_ID,
    HTTPError,
    check_key,
    images_of,
    loaded,
    request_id_of,
    require_key,
)
from hotdog_ray.server.schema import BATCH, ERRORS, EXPLANATION, PREDICTION, SECURED, body_doc

router = APIRouter()

# What a route does with one image's bytes: (context, predictor, bytes) -> the answer.
Work = Callable[[ServerContext, Predictor, bytes], Awaitable[dict[str, Any]]]


@dataclass(kw_only=True)
class AnswerBook:
    """What happens to each answer: counted by class, and queued for the prediction log with its
    request id (which the answer carries, for POST /feedback), latency counted from the request."""

    ctx: ServerContext
    endpoint: str
    request_id: str
    served_by: str = "champion"
    started: float = field(default_factory=time.perf_counter)

    def record(self, result: dict[str, Any], data: bytes) -> None:
        result["request_id"] = self.request_id
        self.ctx.telemetry.prediction(result["label"], self.served_by)
        model = result["model"]
        if not result["in_distribution"]:
            self.ctx.telemetry.out_of_distribution(model["version"], self.served_by)
        if self.ctx.prediction_log is None:
            return
        self.ctx.prediction_log.offer(
            Entry(
                request_id=self.request_id,
                endpoint=self.endpoint,
                model=model["name"],
                version=model["version"],
                served_by=self.served_by,
                label=result["label"],
                probabilities=result["probabilities"],
                ood_score=result["ood_score"],
                in_distribution=result["in_distribution"],
                latency_ms=1000 * (time.perf_counter() - self.started),
                image=data,
            )
        )


async def predict_one(
    ctx: ServerContext, predictor: Predictor, data: bytes, shadow: Shadow | None = None
) -> dict[str, Any]:
    """The app's inference (the replica's batching queue, or direct) on one image's bytes."""
    return predictor.prediction(await ctx.infer(predictor, data, shadow)).to_dict()


async def explain_one(ctx: ServerContext, predictor: Predictor, data: bytes) -> dict[str, Any]:
    ex = await asyncio.to_thread(predictor.explain, data)
    return {
        **ex.prediction.to_dict(),
        "heatmap_png": "data:image/png;base64," + base64.b64encode(ex.overlay_png).decode(),
    }


async def predict_in_rollout(
    role: str, request_id: str, ctx: ServerContext, predictor: Predictor, data: bytes
) -> dict[str, Any]:
    """:func:`predict_one` by ``role``'s model, its latency and confidence booked under ``role``; in
    shadow mode the challenger also scores the champion's decoded image, off the response path."""
    t0 = time.perf_counter()
    rollout, challenger = ctx.service.rollout, ctx.service.challenger
    shadow = None
    if rollout.shadows(role) and challenger is not None:
        shadow = Shadow(challenger=challenger, request_id=request_id, image=data, started=t0)
    result = await predict_one(ctx, predictor, data, shadow)
    rollout.answered(role, 1000 * (time.perf_counter() - t0), result["probability"])
    return result


async def on_one_image(
    request: Request, ctx: ServerContext, predictor: Predictor, work: Work, book: AnswerBook | None = None
) -> dict[str, Any]:
    """The POST endpoints that take one image: read it, run ``work``, and turn bad bytes into a 422;
    ``book`` records the answer (metrics and the prediction log)."""
    ((name, data),) = await images_of(request, ctx, 1)
    try:
        result = await work(ctx, predictor, data)
    except ImageError as err:
        raise HTTPError(422, f"{name}: {err}") from None
    result = {**result, "model": model_of(predictor)}
    if book is not None:
        book.record(result, data)
    return result


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> str:
    return resources.files("hotdog_ray").joinpath("static/index.html").read_text()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a model is loaded")
async def readyz(request: Request) -> JSONResponse:
    service = context_of(request).service
    if service.predictor is None:
        return JSONResponse({"ready": False, "error": service.last_error}, status_code=503)
    return JSONResponse({"ready": True, "model": model_of(service.predictor)})


@router.get("/rollout", summary="This replica's champion against the challenger (rollout.mode)")
async def rollout_figures(request: Request) -> dict[str, Any]:
    service = context_of(request).service
    return {
        "champion": service.key,
        "challenger": service.challenger_key,
        "pid": os.getpid(),
        **service.rollout.summary(),
    }


@router.get("/model", summary="The model being served: name, version, classes, input, training metrics")
async def model(request: Request) -> dict[str, Any]:
    service, _ = loaded(context_of(request))
    return service.info()


@router.post(
    "/predict",
    summary="Classify one image (multipart file field, or the raw image as the body)",
    openapi_extra={**body_doc("file", many=False), **SECURED},
    responses={**PREDICTION, **ERRORS},
)
async def predict(request: Request) -> JSONResponse:
    ctx = context_of(request)
    check_key(ctx, request)
    service, predictor = loaded(ctx)
    rid, headers = request_id_of(request)
    role = service.rollout.choose(has_challenger=service.challenger is not None)
    if role is None:
        book = AnswerBook(ctx=ctx, endpoint="/predict", request_id=rid)
        return JSONResponse(await on_one_image(request, ctx, predictor, predict_one, book), headers=headers)
    chosen = service.challenger if role == "challenger" else predictor
    book = AnswerBook(ctx=ctx, endpoint="/predict", request_id=rid, served_by=role)
    work = functools.partial(predict_in_rollout, role, rid)
    return JSONResponse(await on_one_image(request, ctx, chosen, work, book), headers=headers)


@router.post(
    "/predict/batch",
    summary="Classify several images (multipart); one result or error per image",
    openapi_extra={**body_doc("files", many=True), **SECURED},
    responses={**BATCH, **ERRORS},
)
async def predict_batch(request: Request) -> JSONResponse:
    ctx = context_of(request)
    check_key(ctx, request)
    _, predictor = loaded(ctx)
    rid, headers = request_id_of(request)
    files = await images_of(request, ctx, ctx.settings.limits.max_images_per_request)
    model = model_of(predictor)

    async def one(i: int, name: str, data: bytes) -> dict[str, Any]:
        book = AnswerBook(ctx=ctx, endpoint="/predict/batch", request_id=f"{rid}-{i}")
        try:
            result = {"filename": name, **(await predict_one(ctx, predictor, data)), "model": model}
        except ImageError as err:
            ctx.telemetry.error("bad_image")
            return {"filename": name, "error": str(err)}
        book.record(result, data)
        del result["model"]  # said once for the whole batch
        return result

    results = await asyncio.gather(*(one(i, n, d) for i, (n, d) in enumerate(files)))
    return JSONResponse({"results": results, "model": model}, headers=headers)


@router.post(
    "/explain",
    summary="Classify one image and show where the model looked (Grad-CAM PNG overlay)",
    openapi_extra={**body_doc("file", many=False), **SECURED},
    responses={**EXPLANATION, **ERRORS},
)
async def explain(request: Request) -> JSONResponse:
    ctx = context_of(request)
    check_key(ctx, request)
    _, predictor = loaded(ctx)
    return JSONResponse(await on_one_image(request, ctx, predictor, explain_one))


class FeedbackIn(BaseModel):
    """The true label of an answered image, for accuracy by model version (hotdog rollout report)."""

    request_id: str = Field(
        pattern=f"^{REQUEST_ID.pattern}$",  # anchored: JSON Schema and pydantic patterns search
        description="the answer's request_id (also its X-Request-Id header)",
    )
    label: str = Field(min_length=1, max_length=200, description="what the image really shows")


@router.post(
    "/feedback",
    dependencies=[Depends(require_key)],
    openapi_extra=SECURED,
    status_code=202,
    summary="The true label of an answered image (stored beside the prediction log)",
    responses={
        202: {"description": "stored (written with the next flush of the prediction log)"},
        401: ERRORS[401],
        404: {
            "description": "feedback is off: prediction_log.location is not set",
            "content": ERRORS[401]["content"],
        },
        503: {
            "description": "the prediction log's writer is behind; try again later",
            "content": ERRORS[401]["content"],
        },
    },
)
async def feedback(request: Request, body: FeedbackIn) -> JSONResponse:
    store = context_of(request).feedback_log
    if store is None:
        raise HTTPError(404, "feedback is off on this server: prediction_log.location is not set")
    if not store.offer(Feedback(request_id=body.request_id, label=body.label)):
        raise HTTPError(503, "feedback is not keeping up; try again later")
    return JSONResponse({"request_id": body.request_id, "label": body.label, "stored": True}, status_code=202)
