"""The FastAPI app around a :class:`ServerContext`: routes, errors, metrics middleware, schema."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from fastapi import FastAPI

from hotdog_ray import __version__
from hotdog_ray.errors import ImageError
from hotdog_ray.predict import Predictor, Scores
from hotdog_ray.server import schema
from hotdog_ray.server.context import ServerContext, Shadow
from hotdog_ray.server.http import HTTPError, RequestMetrics, http_error
from hotdog_ray.server.routes import router


def create_api(ctx: ServerContext) -> FastAPI:
    """The HTTP API and the web page of ``ctx``; its lifespan's end writes the logs' last rows."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.close()

    app = FastAPI(
        title="hotdog-ray",
        version=__version__,
        description="Image classification: is it a hotdog? Upload a photo, get the label, "
        "every class's probability and where the model looked.",
        lifespan=lifespan,
    )
    app.state.context = ctx
    app.add_middleware(RequestMetrics, telemetry=ctx.telemetry)
    app.add_exception_handler(HTTPError, http_error)
    app.include_router(router)
    schema.install(app, ctx)
    return app


def one_result(result: Scores | ImageError) -> Scores:
    """A batch's answer for one image: its scores, or its ImageError raised."""
    if isinstance(result, ImageError):
        raise result
    return result


async def direct_infer(predictor: Predictor, data: bytes, shadow: Shadow | None = None) -> Scores:
    """One image, one forward pass (no batching, no rollout: a plain server has no challenger)."""
    return one_result((await asyncio.to_thread(predictor.predict_many, [data]))[0])
