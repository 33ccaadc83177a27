"""The OpenAPI schema: image bodies the handlers read themselves, the answers they return as JSON
directly, the errors, the API key scheme, and the limits filled in from the app's settings."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.security import HTTPBearer

from hotdog_ray.server.context import ServerContext

# The API key scheme, as the schema declares it, and the routes that need it.
BEARER = HTTPBearer(auto_error=False, description="an API key of serve.api_keys_env, when it is set")
SECURED = {"security": [{"HTTPBearer": []}]}

IMAGE_DOC = (
    "an image file (JPEG, PNG, GIF, BMP, TIFF or WebP; grayscale, palette, RGBA, CMYK and 16-bit are "
    "converted) at least {min_side} pixels a side and at most {max_pixels} pixels in all; the whole "
    "request at most {max_bytes} bytes"
)


def body_doc(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI for a body the handler reads itself: multipart file(s), or (one image) the raw bytes.

    The limits are the app's settings, filled in by :func:`with_limits` when the schema is built."""
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


def drop_security(schema: dict[str, Any]) -> None:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.pop("security", None)
            operation.get("responses", {}).pop("401", None)
    schema.get("components", {}).pop("securitySchemes", None)


def with_limits(schema: dict[str, Any], limits: dict[str, int]) -> dict[str, Any]:
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
        (413, "body over serve.limits.max_upload_bytes"),
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
        "ood_score": {
            "type": ["number", "null"],
            "description": "out-of-distribution score, the negative energy of the logits: higher is less "
            "like the training images (null: a model exported before the score existed)",
        },
        "in_distribution": {
            "type": "boolean",
            "description": "false when ood_score is past the threshold set on the validation split (at "
            "monitor.ood_acceptance of it): the image does not look like anything the model was trained "
            "on, whatever the label's probability",
        },
        "model": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "version": {"type": ["string", "null"]}},
        },
    },
}


def answer(description: str, schema: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {200: {"description": description, "content": {"application/json": {"schema": schema}}}}


PREDICTION = answer(
    "the label, every class's calibrated probability, the top k and the out-of-distribution flag", _PREDICTION
)
BATCH = answer(
    "one result (with its filename) or one error per image, in order",
    {"type": "object", "properties": {"results": {"type": "array", "items": _PREDICTION}}},
)
EXPLANATION = answer(
    "the prediction and a PNG data URL of the heatmap",
    {**_PREDICTION, "properties": {**_PREDICTION["properties"], "heatmap_png": {"type": "string"}}},
)


def install(app: FastAPI, ctx: ServerContext) -> None:
    """Has ``app`` serve its schema with the context's limits, the key scheme only when keys are
    set, and ``/feedback`` only when feedback is on."""
    build_schema = app.openapi
    limits = {
        "min_side": ctx.min_side,
        "max_pixels": ctx.max_pixels,
        "max_bytes": ctx.settings.limits.max_upload_bytes,
        "max_images": ctx.settings.limits.max_images_per_request,
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = with_limits(build_schema(), limits)
            if ctx.api_keys is None:  # open: the schema must not ask for a key
                drop_security(schema)
            else:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["HTTPBearer"] = jsonable_encoder(BEARER.model, by_alias=True, exclude_none=True)
            if ctx.feedback_log is None:  # off: nothing there to describe
                schema["paths"].pop("/feedback", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
