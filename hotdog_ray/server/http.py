"""HTTP plumbing the routes share: errors with reasons, the API key check, bounded bodies, images
out of multipart or raw bodies, request ids, and per-request metrics (pure ASGI middleware)."""

from __future__ import annotations

import re
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from hotdog_ray.predict import Predictor
from hotdog_ray.predlog import new_request_id
from hotdog_ray.server.context import ServerContext, context_of
from hotdog_ray.server.keys import key_matches
from hotdog_ray.server.service import ModelService
from hotdog_ray.telemetry import Telemetry, reason_of

# Content types a client may post an image as, besides multipart/form-data.
RAW_TYPES = ("image/", "application/octet-stream")

# A request's X-Request-Id (the client's, or the one Ray Serve's proxy gives every request and
# echoes in the response) is kept when it is short and plain; otherwise we make one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class HTTPError(Exception):
    """An answer with a status and a reason, as ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        self.status, self.reason = status, reason


async def http_error(request: Request, exc: HTTPError) -> JSONResponse:
    context_of(request).telemetry.error(reason_of(exc.status))
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)


# The routes take the model and check the key in their own code, not through FastAPI dependencies:
# solving those was a sixth of a replica's event loop under load at 120 px (py-spy), for what two
# attribute reads and a header do.
def check_key(ctx: ServerContext, request: Request) -> None:
    """401 with a reason unless the request carries one of the app's keys (when it has any)."""
    if ctx.api_keys is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise HTTPError(401, "this endpoint needs an API key: send `Authorization: Bearer <key>`")
    if not key_matches(given, ctx.api_keys):
        raise HTTPError(401, "the API key is not valid")


async def require_key(request: Request) -> None:
    """:func:`check_key` as a dependency, for a route whose body FastAPI validates (a request
    without a key gets 401 before any 422 about its body)."""
    check_key(context_of(request), request)


def loaded(ctx: ServerContext) -> tuple[ModelService, Predictor]:
    """The model service and the model to answer with; a request keeps that model even if a
    reload swaps in another meanwhile."""
    predictor = ctx.service.predictor
    if predictor is None:
        raise HTTPError(503, f"no model loaded yet ({ctx.service.last_error or 'loading'})")
    return ctx.service, predictor


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
    return b"".join(chunks)


async def images_of(request: Request, ctx: ServerContext, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request: multipart files, or the raw body."""
    body = await read_body(request, ctx.settings.limits.max_upload_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        files = await multipart_files(request, body, max_images)
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


async def multipart_files(request: Request, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    """The file parts of a multipart ``body`` already read (and size-checked) from ``request``."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    # The request's own stream is spent: Starlette parses the form from a request that replays it.
    form_request = Request(request.scope, receive=replay)
    try:
        form = await form_request.form(max_files=max_images, max_fields=max_images + 16)
    except (MultiPartException, HTTPException) as exc:  # malformed multipart, or too many parts
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise HTTPError(400, f"too many images: the limit is {max_images} per request") from None
        raise HTTPError(400, f"malformed multipart body: {detail}") from None
    files = [(f.filename or key, await f.read()) for key, f in form.multi_items() if hasattr(f, "read")]
    if not files:
        raise HTTPError(400, "no file in the multipart body (send the image as a file field)")
    return files


def request_id_of(request: Request) -> tuple[str, dict[str, str]]:
    """The request's id, and the response headers that carry it when nobody else echoes it."""
    given = request.headers.get("x-request-id")
    if given and REQUEST_ID.fullmatch(given):
        return given, {}
    rid = new_request_id()
    return rid, {"X-Request-Id": rid}


class RequestMetrics:
    """Pure ASGI middleware: requests by endpoint (the route's template, so labels stay bounded)
    and status, and their latency. Cheaper than Starlette's BaseHTTPMiddleware, which wraps every
    response in a stream."""

    def __init__(self, app: Any, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

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
            self.telemetry.request(endpoint, status, time.perf_counter() - t0)
