"""Online predictions: a FastAPI app, served by Ray Serve with dynamic batching and hot reload.

The HTTP routes (:data:`router`) and the model holder (:class:`ModelService`) know nothing of
Ray: a route reaches the model through the app's state, which :func:`create_api` fills, so the
same routes also run in one plain uvicorn process (``bench/serve.py``'s baseline).
:class:`HotdogReplica` is the Serve ingress; :func:`build_app` is the Serve application builder
used by ``hotdog serve`` and ``serving/serve_config.yaml``.
Ray Serve is imported at module level: this module only runs where a server runs.

Hot reload: every ``serve.reload_interval_s`` a replica resolves its model reference (the
registry alias by default) and, when it names another version, loads it beside the old one and
swaps. A request holds the model it started with, so requests in flight finish on the old one
and none fails during the switch. A ``user_config`` change (``serve deploy`` with a new
``reload_token`` or ``model_uri``) reloads at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from ray import serve

from hotdog_ray import __version__
from hotdog_ray.config import Config, ServeSettings, from_dict, load_config
from hotdog_ray.errors import ConfigError, ImageError
from hotdog_ray.metrics import NoMetrics, reason_of, serve_metrics
from hotdog_ray.predict import Predictor, cpu_threads
from hotdog_ray.predlog import FEEDBACK, Entry, Feedback, FeedbackLog, PredictionLog, new_request_id
from hotdog_ray.rollout import RolloutStats
from hotdog_ray.runtime import sigterm_interrupts

log = logging.getLogger(__name__)

# Ray Serve's switch from its Python proxy to HAProxy routing straight to the replicas.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
HAPROXY_THREADS_ENV = "RAY_SERVE_HAPROXY_NBTHREAD"
HAPROXY_METRICS_ENV = "RAY_SERVE_HAPROXY_METRICS_ENABLED"


def haproxy_threads(cpus: int) -> int:
    """HAProxy's threads on a node of ``cpus`` cores: a quarter of them, 1 to 4 (pure). One thread
    forwards tens of thousands of requests a second; the cores are the replicas'."""
    return max(1, min(4, cpus // 4))


def set_serve_env(s: ServeSettings, drain_s: float) -> None:
    """Serve's switches that the processes Ray starts read from their environment, so set before Ray
    starts (a value already exported wins): the HAProxy ingress, its threads and per-request metrics,
    the throughput mode, and how long a leaving replica drains (Ray's 30 s are for outside load
    balancers; here the only one is Serve's own HAProxy, and Ctrl-C would wait them out)."""
    os.environ.setdefault(HAPROXY_ENV, "1" if s.haproxy else "0")
    os.environ.setdefault(THROUGHPUT_ENV, "1" if s.throughput_optimized else "0")
    os.environ.setdefault(DRAIN_ENV, f"{drain_s:g}")
    threads = s.haproxy_threads or haproxy_threads(os.cpu_count() or 1)
    os.environ.setdefault(HAPROXY_THREADS_ENV, str(threads))
    os.environ.setdefault(HAPROXY_METRICS_ENV, "1" if s.haproxy_request_metrics else "0")


# The API key scheme, as the OpenAPI schema declares it (create_api), and the routes that need it.
BEARER = HTTPBearer(auto_error=False, description="an API key of serve.api_keys_env, when it is set")
SECURED = {"security": [{"HTTPBearer": []}]}

# Content types a client may post an image as, besides multipart/form-data.
RAW_TYPES = ("image/", "application/octet-stream")

# Runs the model on one encoded image: its probabilities, or raises ImageError; with a Shadow, the
# challenger also scores the image later, off the response path.
Infer = Callable[..., Awaitable[np.ndarray]]


@dataclass
class Shadow:
    """A request's shadow: the challenger, and what to do with its and the champion's answers."""

    challenger: Predictor
    # (challenger's probabilities, champion's) -> the challenger's label and whether both agreed
    done: Callable[[np.ndarray, np.ndarray], tuple[str, bool]]


# Queued shadow work: the champion, the request's shadow, the decoded image and the champion's answer.
ShadowJob = tuple[Predictor, Shadow, np.ndarray, np.ndarray]


class MicroBatcher:
    """Dynamic batching on the event loop: items are grouped and ``run`` takes them a batch at a
    time. An item queued while a batch runs waits for the next, which takes every item queued
    meanwhile, up to ``max_size``; with ``wait_s`` > 0 a batch that is not full waits up to that
    long for more. What ``@serve.batch`` does, without its per-call costs (a signature inspection
    per call, a gauge update and a task per wait): a sixth of a replica's busy event loop under
    load at 120 px (py-spy). ``run`` gets the items and returns one result each; an exception it raises
    goes to every caller of the batch."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_size: int, wait_s: float = 0.0):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self._queue: list[tuple[Any, asyncio.Future | None]] = []
        self._worker: asyncio.Task | None = None
        self._full = asyncio.Event()  # set when a full batch is queued (awaited only with wait_s)

    async def __call__(self, item: Any) -> Any:
        """``run``'s result for ``item``."""
        future = asyncio.get_running_loop().create_future()
        self._put(item, future)
        return await future

    def offer(self, item: Any) -> None:
        """Queues ``item`` for ``run`` without waiting for it (its result is dropped)."""
        self._put(item, None)

    async def drained(self) -> None:
        """Returns once every queued item has run."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    def _put(self, item: Any, future: asyncio.Future | None) -> None:
        self._queue.append((item, future))
        if len(self._queue) >= self.max_size:
            self._full.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            if self.wait_s > 0 and len(self._queue) < self.max_size:
                self._full.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
            taken, self._queue = self._queue[: self.max_size], self._queue[self.max_size :]
            taken = [(item, f) for item, f in taken if f is None or not f.done()]  # callers gone
            if not taken:
                continue
            results: list[Any] | None = None
            try:
                results = await self.run([item for item, _ in taken])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                error = exc
            for i, (_, future) in enumerate(taken):
                if future is None or future.done():
                    continue
                if results is None:
                    future.set_exception(error)
                else:
                    future.set_result(results[i])


class PassRunner:
    """Runs a batch's decoding and forward pass in a worker thread, or, for a lone image whose last
    lone pass took at most ``inline_max_s``, on the event loop itself.

    At low load a request is a lone batch, and the hop to a worker thread and back (a thread wake-up
    each way, and the GIL passed between two busy threads) cost 0.4-1.1 ms of p50 at concurrency 1
    and 0.3-1.0 ms of replica CPU a request on 2 cores (bench/RESULTS.md). Blocking the loop that
    long is harmless: requests arriving meanwhile would wait for the next batch anyway. A model whose
    pass takes longer stays in the thread (the first lone pass always runs there, to be timed), so the
    loop stays free for health checks and uploads; a photo far larger than the last blocks the loop
    once, for its own pass, and sends the next lone pass back to the thread.
    """

    def __init__(self, inline_max_s: float = 0.005) -> None:
        self.inline_max_s = inline_max_s
        self.lone_s = float("inf")  # the last lone pass, hop included when it ran in a thread

    async def __call__(self, fn: Callable[[Any], Any], arg: Any, *, lone: bool) -> Any:
        if not lone:
            return await asyncio.to_thread(fn, arg)
        t0 = time.perf_counter()
        try:
            if self.lone_s <= self.inline_max_s:
                return fn(arg)
            return await asyncio.to_thread(fn, arg)
        finally:
            self.lone_s = time.perf_counter() - t0


class ModelService:
    """The model one server process answers with, and the switch to a newer one."""

    def __init__(self, cfg: Config, ref: str | None = None) -> None:
        self.cfg = cfg
        self.ref = ref or cfg.serve.model_uri
        self.predictor: Predictor | None = None
        self.key: str | None = None  # the concrete model loaded (a version, a run, a folder)
        self.last_error: str | None = None
        self.metrics: dict[str, float] = {}
        self.challenger: Predictor | None = None  # serve.rollout's model, when the alias is set
        self.challenger_key: str | None = None
        self.rollout = RolloutStats()
        self.telemetry: NoMetrics = serve_metrics()
        self._lock = threading.Lock()

    def _resolve(self) -> str:
        """The concrete model the reference names now: an alias resolves to its current version."""
        from hotdog_ray import registry

        return registry.resolve_model_ref(
            self.cfg.tracking, self.ref or registry.default_model_ref(self.cfg.tracking)
        )

    def refresh(self) -> bool:
        """Load the model the reference names now, if it is not the one loaded; True if it switched.

        A failure keeps the old model serving (and is logged, and shown by /readyz when no model
        was ever loaded).
        """
        from hotdog_ray import registry

        with self._lock:  # one load at a time; requests keep using self.predictor meanwhile
            if self.cfg.serve.rollout != "off":
                self._refresh_challenger()
            try:
                key = self._resolve()
                if key == self.key:
                    return False
                predictor = self._load(key)
                run_id = predictor.bundle.meta.get("run_id")
                metrics = registry.run_metrics(self.cfg.tracking, run_id) if run_id else {}
            except Exception as exc:  # noqa: BLE001 - whatever fails (store, download, weights), the old model keeps serving
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("model reload failed, still serving %s: %s", self.key, self.last_error)
                return False
            old, old_predictor = self.key, self.predictor
            self.predictor, self.key, self.metrics, self.last_error = predictor, key, metrics, None
            self.rollout = RolloutStats()  # a new champion: a new pair to compare
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
            min_side=s.min_image_side,
            top_k=s.top_k,
            device="cuda" if s.gpus_per_replica > 0 else "cpu",
            threads=cpu_threads(s.cpus_per_replica),
        )

    def _refresh_challenger(self) -> None:
        """Load the version the challenger alias names now (None when it is unset), beside the champion."""
        from hotdog_ray import registry

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
        self.rollout = RolloutStats()  # figures are per champion-challenger pair
        log.info("rollout %s: challenger %s", self.cfg.serve.rollout, key)

    def info(self) -> dict[str, Any]:
        p = self.predictor
        if p is None:
            return {"loaded": False, "error": self.last_error}
        # pid: which server process answered (a reload keeps it; a restarted replica does not)
        return {**p.info, "loaded": True, "key": self.key, "metrics": self.metrics, "pid": os.getpid()}


# --------------------------------------------------------------------------------------------
# HTTP


class HTTPError(Exception):
    """An answer with a status and a reason, as ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        self.status, self.reason = status, reason


async def http_error(request: Request, exc: HTTPError) -> JSONResponse:
    request.app.state.metrics.error(reason_of(exc.status))
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


# The routes take the model and check the key in their own code, not through FastAPI dependencies:
# solving those was a sixth of a replica's event loop under load at 120 px (py-spy), for what two
# attribute reads and a header do.
def settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def api_keys(env_name: str | None) -> list[bytes] | None:
    """The keys in the variable ``env_name`` names (None: the endpoints are open). A named variable
    that is unset or empty is an error: a misconfigured deployment must not open up."""
    if env_name is None:
        return None
    keys = [k.encode() for k in re.split(r"[\s,]+", os.environ.get(env_name, "")) if k]
    if not keys:
        raise ConfigError(
            f"serve.api_keys_env names {env_name}, which holds no key in this process's environment "
            "(on a cluster: set it on every node, e.g. from a Kubernetes Secret)"
        )
    return keys


def key_matches(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``, comparing with every key in constant time."""
    candidate = given.encode()
    return sum(hmac.compare_digest(candidate, k) for k in keys) > 0


def check_key(request: Request) -> None:
    """401 with a reason unless the request carries one of the app's keys (when it has any)."""
    keys = request.app.state.api_keys
    if keys is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise HTTPError(401, "this endpoint needs an API key: send `Authorization: Bearer <key>`")
    if not key_matches(given, keys):
        raise HTTPError(401, "the API key is not valid")


async def require_key(request: Request) -> None:
    """:func:`check_key` as a dependency, for a route whose body FastAPI validates (a request
    without a key gets 401 before any 422 about its body)."""
    check_key(request)


def loaded(request: Request) -> tuple[ModelService, Predictor]:
    """The model service and the model to answer with; a request keeps that model even if a
    reload swaps in another meanwhile."""
    service: ModelService = request.app.state.service
    predictor = service.predictor
    if predictor is None:
        raise HTTPError(503, f"no model loaded yet ({service.last_error or 'loading'})")
    return service, predictor


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    request._body = b"".join(chunks)  # starlette parses forms from the cached body
    return request._body


async def images_of(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request: multipart files, or the raw body."""
    body = await read_body(request, settings(request).max_upload_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        files = await _multipart_files(request, max_images)
    elif ctype.startswith(RAW_TYPES) or (not ctype and body):
        files = [("body", body)]
    else:
        raise HTTPError(
            415,
            f"content type {ctype or 'none'!r} is not an image: send image/*, "
            "application/octet-stream or multipart/form-data",
        )
    if len(files) > max_images:
        raise HTTPError(400, f"too many images: {len(files)} in one request, the limit is {max_images}")
    return files


async def _multipart_files(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=max_images, max_fields=max_images + 16)
    except (MultiPartException, HTTPException) as exc:  # malformed multipart, or too many parts
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise HTTPError(400, f"too many images: the limit is {max_images} per request") from None
        raise HTTPError(400, f"malformed multipart body: {detail}") from None
    files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if hasattr(f, "read")]
    if not files:
        raise HTTPError(400, "no file in the multipart body (send the image as a file field)")
    return files


async def predict_one(
    request: Request, predictor: Predictor, data: bytes, shadow: "Shadow | None" = None
) -> dict[str, Any]:
    """The app's inference (the replica's batching queue, or direct) on one image's bytes."""
    probs = await request.app.state.infer(predictor, data, shadow)
    return predictor.predictions(probs[None])[0].to_dict()


def one_result(result: np.ndarray | ImageError) -> np.ndarray:
    if isinstance(result, ImageError):
        raise result
    return result


async def explain_one(request: Request, predictor: Predictor, data: bytes) -> dict[str, Any]:
    ex = await asyncio.to_thread(predictor.explain, data)
    return {
        **ex.prediction.to_dict(),
        "heatmap_png": "data:image/png;base64," + base64.b64encode(ex.overlay_png).decode(),
    }


async def on_one_image(
    request: Request,
    predictor: Predictor,
    work: Callable[..., Awaitable[dict[str, Any]]],
    answered: Callable[[dict[str, Any], bytes], None] | None = None,
):
    """The POST endpoints that take one image: read it, run ``work``, and turn bad bytes into a 422;
    ``answered(result, image)`` sees each answer (metrics and the prediction log)."""
    ((name, data),) = await images_of(request, 1)
    try:
        result = await work(request, predictor, data)
    except ImageError as err:
        raise HTTPError(422, f"{name}: {err}") from None
    result = {**result, "model": model_of(predictor)}
    if answered is not None:
        answered(result, data)
    return result


# A request's X-Request-Id (the client's, or the one Ray Serve's proxy gives every request and
# echoes in the response) is kept when it is short and plain; otherwise we make one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(request: Request) -> tuple[str, dict[str, str]]:
    """The request's id, and the response headers that carry it when nobody else echoes it."""
    given = request.headers.get("x-request-id")
    if given and REQUEST_ID.fullmatch(given):
        return given, {}
    rid = new_request_id()
    return rid, {"X-Request-Id": rid}


def recorder(
    request: Request, endpoint: str, request_id: str, served_by: str = "champion"
) -> Callable[[dict[str, Any], bytes], None]:
    """What happens to each answer: counted by class, and queued for the prediction log with its
    request id (which the answer carries, for POST /feedback), latency counted from now."""
    state, t0 = request.app.state, time.perf_counter()

    def answered(result: dict[str, Any], data: bytes) -> None:
        result["request_id"] = request_id
        state.metrics.prediction(result["label"], served_by)
        if state.prediction_log is not None:
            model = result["model"]
            state.prediction_log.offer(
                Entry(
                    request_id,
                    endpoint,
                    model["name"],
                    model["version"],
                    served_by,
                    result["label"],
                    result["probabilities"],
                    1000 * (time.perf_counter() - t0),
                    data,
                )
            )

    return answered


def model_of(predictor: Predictor) -> dict[str, Any]:
    info = predictor.info
    return {"name": info["name"], "version": info["version"]}


IMAGE_DOC = (
    "an image file (JPEG, PNG, GIF, BMP, TIFF or WebP; grayscale, palette, RGBA, CMYK and 16-bit are "
    "converted) at least {min_side} pixels a side and at most {max_pixels} pixels in all; the whole "
    "request at most {max_bytes} bytes"
)


def body_doc(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI for a body the handler reads itself: multipart file(s), or (one image) the raw bytes.

    The limits are the app's settings, filled in by :func:`_with_limits` when the schema is built."""
    binary = {"type": "string", "format": "binary", "description": IMAGE_DOC}
    part = {"type": "array", "items": binary, "minItems": 1, "maxItems": "{max_images}"} if many else binary
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {field: part}, "required": [field]}
        }
    }
    if not many:
        content["image/*"] = {"schema": binary}
        content["application/octet-stream"] = {"schema": binary}
    return {"requestBody": {"required": True, "content": content}}


def _drop_security(schema: dict[str, Any]) -> None:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
    schema.get("components", {}).pop("securitySchemes", None)


def _with_limits(schema: dict[str, Any], limits: dict[str, int]) -> dict[str, Any]:
    """The request bodies' limit placeholders replaced by the app's values (an int stays an int)."""

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str) and "{" in node:
            name = node.strip("{}")
            return limits[name] if node == f"{{{name}}}" else node.format(**limits)
        return node

    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" in operation:
                operation["requestBody"] = fill(operation["requestBody"])
    return schema


ERRORS = {
    code: {
        "description": text,
        "content": {
            "application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}
        },
    }
    for code, text in (
        (400, "too many images, or no file"),
        (401, "no API key, or not a valid one (when serve.api_keys_env is set)"),
        (413, "body over serve.max_upload_bytes"),
        (415, "content type is not an image"),
        (422, "not a usable image (the reason says why)"),
        (503, "no model loaded yet"),
    )
}

# The answers' schemas, written out: the handlers return JSONResponse directly, because FastAPI's
# validation and encoding of a returned dict cost a visible share of a small request.
_PREDICTION = {
    "type": "object",
    "properties": {
        "label": {"type": "string"},
        "probability": {"type": "number"},
        "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
        "top_k": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"label": {"type": "string"}, "probability": {"type": "number"}},
            },
        },
        "model": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "version": {"type": ["string", "null"]}},
        },
    },
}


def answer(description: str, schema: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {200: {"description": description, "content": {"application/json": {"schema": schema}}}}


PREDICTION = answer("the label, every class's probability and the top k", _PREDICTION)
BATCH = answer(
    "one result (with its filename) or one error per image, in order",
    {"type": "object", "properties": {"results": {"type": "array", "items": _PREDICTION}}},
)
EXPLANATION = answer(
    "the prediction and a PNG data URL of the heatmap",
    {**_PREDICTION, "properties": {**_PREDICTION["properties"], "heatmap_png": {"type": "string"}}},
)

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> str:
    return resources.files("hotdog_ray").joinpath("static/index.html").read_text()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: a model is loaded")
async def readyz(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service.predictor is None:
        return JSONResponse({"ready": False, "error": service.last_error}, status_code=503)
    return JSONResponse({"ready": True, "model": model_of(service.predictor)})


@router.get("/rollout", summary="This replica's champion against the challenger (serve.rollout)")
async def rollout(request: Request) -> dict[str, Any]:
    service = request.app.state.service
    return {
        "mode": service.cfg.serve.rollout,
        "champion": service.key,
        "challenger": service.challenger_key,
        "pid": os.getpid(),
        **service.rollout.summary(),
    }


@router.get("/model", summary="The model being served: name, version, classes, input, training metrics")
async def model(request: Request) -> dict[str, Any]:
    service, _ = loaded(request)
    return service.info()


@router.post(
    "/predict",
    summary="Classify one image (multipart file field, or the raw image as the body)",
    openapi_extra={**body_doc("file", many=False), **SECURED},
    responses={**PREDICTION, **ERRORS},
)
async def predict(request: Request) -> JSONResponse:
    check_key(request)
    service, predictor = loaded(request)
    s, (rid, headers) = settings(request), request_id_of(request)
    request.state.request_id = rid  # the shadow's row in the prediction log names it too
    if s.rollout == "off" or service.challenger is None:
        answered = recorder(request, "/predict", rid)
        return JSONResponse(await on_one_image(request, predictor, predict_one, answered), headers=headers)
    role = "challenger" if s.rollout == "canary" and random.random() < s.canary_fraction else "champion"
    chosen = service.challenger if role == "challenger" else predictor
    answered = recorder(request, "/predict", rid, served_by=role)
    result = await on_one_image(request, chosen, rollout_work(service, role), answered)
    return JSONResponse(result, headers=headers)


def rollout_work(service: ModelService, role: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    """:func:`predict_one` that records its latency and confidence under ``role``; in shadow mode the
    champion's request also has the challenger score the same decoded image, off the response path."""

    async def work(request: Request, predictor: Predictor, data: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        stats = service.rollout
        challenger = service.challenger
        shadow = None
        if role == "champion" and settings(request).rollout == "shadow" and challenger is not None:

            def done(challenger_probs: np.ndarray, champion_probs: np.ndarray) -> tuple[str, bool]:
                theirs = challenger.classes[int(np.argmax(challenger_probs))]
                ours = predictor.classes[int(np.argmax(champion_probs))]
                latency_ms = 1000 * (time.perf_counter() - t0)
                stats.sample("challenger", latency_ms, float(challenger_probs.max()))
                stats.shadowed += 1
                stats.agreed += theirs == ours
                plog = request.app.state.prediction_log
                if plog is not None:  # the challenger's answer beside the champion's, same request id
                    model = model_of(challenger)
                    probs = dict(zip(challenger.classes, map(float, challenger_probs)))
                    plog.offer(
                        Entry(
                            request.state.request_id,
                            "/predict",
                            model["name"],
                            model["version"],
                            "shadow",
                            theirs,
                            probs,
                            latency_ms,
                            data,
                        )
                    )
                if stats.shadowed % 500 == 0:
                    log.info("shadow %s against %s: %s", service.challenger_key, service.key, stats.summary())
                return theirs, theirs == ours

            shadow = Shadow(challenger, done)
        result = await predict_one(request, predictor, data, shadow)
        stats.sample(role, 1000 * (time.perf_counter() - t0), result["probability"])
        if role == "challenger":
            stats.canary += 1
        else:
            stats.served += 1
        return result

    return work


@router.post(
    "/predict/batch",
    summary="Classify several images (multipart); one result or error per image",
    openapi_extra={**body_doc("files", many=True), **SECURED},
    responses={**BATCH, **ERRORS},
)
async def predict_batch(request: Request) -> JSONResponse:
    check_key(request)
    _, predictor = loaded(request)
    rid, headers = request_id_of(request)
    files = await images_of(request, settings(request).max_images_per_request)
    model = model_of(predictor)

    async def one(i: int, name: str, data: bytes) -> dict[str, Any]:
        answered = recorder(request, "/predict/batch", f"{rid}-{i}")
        try:
            result = {"filename": name, **(await predict_one(request, predictor, data)), "model": model}
        except ImageError as err:
            request.app.state.metrics.error("bad_image")
            return {"filename": name, "error": str(err)}
        answered(result, data)
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
    check_key(request)
    _, predictor = loaded(request)
    return JSONResponse(await on_one_image(request, predictor, explain_one))


class RequestMetrics:
    """Pure ASGI middleware: requests by endpoint (the route's template, so labels stay bounded)
    and status, and their latency. Cheaper than Starlette's BaseHTTPMiddleware, which wraps every
    response in a stream."""

    def __init__(self, app: Any, metrics: NoMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request(endpoint, status, time.perf_counter() - t0)


def prediction_log(cfg: ServeSettings, metrics: NoMetrics) -> PredictionLog | None:
    """The server process's prediction log (``serve.prediction_log``), or None when unset."""
    if not cfg.prediction_log:
        return None
    return PredictionLog(
        cfg.prediction_log,
        sample_rate=cfg.log_sample_rate,
        flush_interval_s=cfg.log_flush_interval_s,
        max_rows=cfg.log_queue_rows,
        log_images=cfg.log_images,
        on_drop=lambda n: metrics.log_rows("dropped", n),
        on_write=lambda n: metrics.log_rows("written", n),
    )


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
            "description": "feedback is off: serve.prediction_log is not set",
            "content": ERRORS[401]["content"],
        },
    },
)
async def feedback(request: Request, body: FeedbackIn) -> JSONResponse:
    store = request.app.state.feedback_log
    if store is None:
        raise HTTPError(404, "feedback is off on this server: serve.prediction_log is not set")
    if not store.offer(Feedback(body.request_id, body.label)):
        raise HTTPError(503, "feedback is not keeping up; try again later")
    return JSONResponse({"request_id": body.request_id, "label": body.label, "stored": True}, status_code=202)


def create_api(service: ModelService, cfg: ServeSettings, infer: Infer) -> FastAPI:
    """The HTTP API and the web page around ``service``; ``infer`` runs the model on one encoded
    image (a Serve replica passes its batching queue, the baseline :func:`direct_infer`)."""
    metrics = service.telemetry
    plog = prediction_log(cfg, metrics)
    feedback_log = (
        None
        if plog is None
        else FeedbackLog(
            plog.location.join(FEEDBACK).uri,
            flush_interval_s=cfg.log_flush_interval_s,
            max_rows=cfg.log_queue_rows,
        )
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        for log_ in (plog, feedback_log):  # the rows still queued, before the process goes
            if log_ is not None:
                await asyncio.to_thread(log_.close)

    app = FastAPI(
        title="hotdog-ray",
        version=__version__,
        description="Image classification: is it a hotdog? Upload a photo, get the label, "
        "every class's probability and where the model looked.",
        lifespan=lifespan,
    )
    app.state.service, app.state.settings, app.state.infer = service, cfg, infer
    app.state.metrics, app.state.prediction_log, app.state.feedback_log = metrics, plog, feedback_log
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.state.api_keys = api_keys(cfg.api_keys_env)
    if app.state.api_keys is None:
        log.warning(
            "serve.api_keys_env is not set: the prediction endpoints are open to anyone who reaches them"
        )
    app.add_exception_handler(HTTPError, http_error)
    app.include_router(router)
    build_schema = app.openapi
    limits = {
        "min_side": cfg.min_image_side,
        "max_pixels": service.cfg.data.max_image_pixels,
        "max_bytes": cfg.max_upload_bytes,
        "max_images": cfg.max_images_per_request,
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = _with_limits(build_schema(), limits)
            if app.state.api_keys is None:  # open: the schema must not ask for a key
                _drop_security(schema)
            else:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["HTTPBearer"] = jsonable_encoder(BEARER.model, by_alias=True, exclude_none=True)
            if feedback_log is None:  # off: nothing there to describe
                schema["paths"].pop("/feedback", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def direct_infer(predictor: Predictor, data: bytes, shadow: Shadow | None = None) -> np.ndarray:
    """One image, one forward pass (no batching, no rollout: a plain server has no challenger)."""
    return one_result((await asyncio.to_thread(predictor.predict_many, [data]))[0])


# --------------------------------------------------------------------------------------------
# Ray Serve


@serve.ingress()
class HotdogReplica:
    """One Serve replica: the model service, its reload poller and the batching queue in front of it."""

    async def __init__(self, raw_config: dict[str, Any]) -> None:
        self.cfg = from_dict(raw_config)
        s = self.cfg.serve
        self._batcher = MicroBatcher(self.infer_batch, s.max_batch_size, s.batch_wait_timeout_s)
        self._passes = PassRunner()
        # Shadow work: one challenger batch at a time per replica (see _shadow_batch).
        self._shadows = MicroBatcher(self._shadow_batch, s.max_batch_size)
        self.service = ModelService(self.cfg)
        await asyncio.to_thread(self.service.refresh)
        self._user_config: dict[str, Any] | None = None
        if s.reload_interval_s > 0:
            self._poller = asyncio.create_task(self._poll())
        if s.rollout != "off":
            self._flusher = asyncio.create_task(self._flush_rollout())

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve runs the app's lifespan: its shutdown writes the prediction log's last rows.
        return create_api(self.service, self.cfg.serve, self.infer)

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
        from hotdog_ray import rollout

        svc = self.service
        if svc.key and svc.challenger_key:
            figures = svc.rollout.to_json()  # on the loop: nothing appends meanwhile
            try:
                await asyncio.to_thread(rollout.write, self.cfg, svc.key, svc.challenger_key, figures)
            except Exception as exc:  # noqa: BLE001 - figures must never stop the replica
                log.warning("could not write rollout figures to %s: %s", self.cfg.rollout.store, exc)

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (after the app's lifespan): the shadow work still
        queued runs, and the rollout figures gathered since the last flush are written, not lost."""
        cfg = getattr(self, "cfg", None)  # None when __init__ failed before setting it
        if cfg is not None and cfg.serve.rollout != "off":
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

    async def infer(self, predictor: Predictor, data: bytes, shadow: Shadow | None = None) -> np.ndarray:
        return one_result(await self._batcher((predictor, data, shadow)))

    # Decoding and the forward pass run together, one worker thread hop per batch (none for a cheap
    # lone image, see PassRunner): a hop per request for decoding cost as much as decoding a small photo.
    async def infer_batch(
        self, items: list[tuple[Predictor, bytes, Shadow | None]]
    ) -> list[np.ndarray | ImageError]:
        self.service.telemetry.batch(len(items))
        # A batch may straddle a reload: each image runs on the model its request started with.
        out: list[Any] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (predictor, _, _) in enumerate(items):
            groups.setdefault(id(predictor), []).append(i)
        for idx in groups.values():
            predictor = items[idx[0]][0]
            # A shadowed image stays in the thread: its challenger's pass follows in another thread,
            # and with the loop also running passes shadow at 32 measured 0.58x of off (0.63-0.74 before).
            lone = len(items) == 1 and items[0][2] is None
            results, inputs = await self._passes(
                predictor.decode_and_predict, [items[i][1] for i in idx], lone=lone
            )
            for i, result in zip(idx, results):
                out[i] = result
            for i, x, result in zip(idx, inputs, results):
                if items[i][2] is not None and x is not None:
                    self._shadows.offer((predictor, items[i][2], x, result))
        return out

    async def _shadow_batch(self, jobs: list[ShadowJob]) -> list[None]:
        """One batch of queued shadow work (up to ``serve.max_batch_size`` images, queued while the
        previous one ran). Under load the challenger's batches fill (its weights are read once a
        batch, not once an image) and its passes do not crowd the champion's on the cores; at low
        load each batch runs as soon as its answers went out."""
        # A reload may have swapped the champion or the challenger between two requests.
        pairs: dict[tuple[int, int], list[ShadowJob]] = {}
        for job in jobs:
            pairs.setdefault((id(job[0]), id(job[1].challenger)), []).append(job)
        for group in pairs.values():
            await self._shadow(group[0][0], [job[1:] for job in group])
        return [None] * len(jobs)

    async def _shadow(
        self, champion: Predictor, shadows: list[tuple[Shadow, np.ndarray, np.ndarray]]
    ) -> None:
        """One challenger on the champion's decoded images, batched, after the answers went out."""
        challenger = shadows[0][0].challenger

        def score() -> np.ndarray:
            inputs = [x for _, x, _ in shadows]
            if challenger.image_size != champion.image_size:  # resize what the champion saw
                from PIL import Image

                size = (challenger.image_size, challenger.image_size)
                inputs = [np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR)) for x in inputs]
            return challenger.predict_arrays(np.stack(inputs))

        try:
            rows = await asyncio.to_thread(score)
        except Exception as exc:  # noqa: BLE001 - the shadow must never disturb serving
            log.warning("shadow batch failed: %s", exc)
            return
        answers = [shadow.done(row, champion_row) for (shadow, _, champion_row), row in zip(shadows, rows)]
        # One metric update per distinct value and batch, not two per answer.
        telemetry = self.service.telemetry
        for agreed, n in Counter(agreed for _, agreed in answers).items():
            telemetry.shadow(agreed, n)
        for label, n in Counter(label for label, _ in answers).items():
            telemetry.prediction(label, "shadow", n)


def deployment(cfg: Config) -> "serve.Deployment":
    """The Serve deployment for ``cfg``: replicas, autoscaling, resources, reload settings."""
    s = cfg.serve
    actor = {
        "num_cpus": s.cpus_per_replica,
        **({"num_gpus": s.gpus_per_replica} if s.gpus_per_replica else {}),
    }
    return serve.deployment(
        HotdogReplica,
        name="hotdog",
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        },
        ray_actor_options=actor,
        user_config={"reload_token": None, "model_uri": s.model_uri},
        logging_config={"enable_access_log": s.access_log},
    )


def wait_ready(url: str, timeout: float = 120, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``url``/readyz until it answers 200 (True), ``timeout`` passes or ``alive()`` turns False."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return True
        except (OSError, urllib.error.URLError):  # not listening yet, 503 while loading, or slow to start
            pass
        time.sleep(0.5)
    return False


def build_app(args: dict[str, Any]):
    """Serve application builder: ``{"config": "configs/x.yaml", "set": ["serve.port=8001", ...]}``.

    The import path of ``serving/serve_config.yaml`` (``serve run`` and ``serve deploy``).
    """
    overrides = args.get("set") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = load_config(args.get("config"), list(overrides))
    return deployment(cfg).bind(cfg.model_dump(mode="json"))


def run(cfg: Config, *, blocking: bool = True, name: str = "hotdog") -> None:
    """``hotdog serve``: start (or join) Ray, start Serve's HTTP ingress on ``serve.host:port`` and the app.

    Ray started here routes HTTP through HAProxy when ``serve.haproxy`` (the default): one C process
    forwards to the replicas' own HTTP servers, where Serve's Python proxy would cost an extra
    process hop and most of a core under load (bench/RESULTS.md).
    """
    import ray

    from hotdog_ray.runtime import init_ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        log.info(
            "joining a running Ray: its HTTP ingress is the one it was started with (RAY_SERVE_ENABLE_HA_PROXY)"
        )
    else:
        set_serve_env(cfg.serve, drain_s=5)
    init_ray()
    # Ctrl-C or SIGTERM (docker stop, systemd, Kubernetes) at any point, even while the app is still
    # starting, stops Serve cleanly: replicas finish the requests they hold before they exit.
    with sigterm_interrupts(replace=True):
        _serve_until_interrupted(cfg, name, blocking)


def _serve_until_interrupted(cfg: Config, name: str, blocking: bool) -> None:
    try:
        try:
            serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        except Exception:
            if os.environ.get(HAPROXY_ENV) == "1":
                # HAProxy also binds fixed stats and metrics ports (Ray's template) on every interface.
                log.error(
                    "HAProxy did not start; is port %d, 8404 (stats) or 9101 (metrics) taken? Move them "
                    "with RAY_SERVE_HAPROXY_STATS_PORT / RAY_SERVE_HAPROXY_METRICS_PORT, or use Serve's own "
                    "proxy with --set serve.haproxy=false",
                    cfg.serve.port,
                )
            raise
        serve.run(
            deployment(cfg).bind(cfg.model_dump(mode="json")), name=name, route_prefix="/", blocking=False
        )
        log.info("serving on http://%s:%d (docs at /docs); Ctrl-C stops", cfg.serve.host, cfg.serve.port)
        while blocking:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping: finishing the requests in flight")
        serve.shutdown()
        log.info("stopped")
