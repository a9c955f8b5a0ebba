"""What ``GET /openapi.json`` says beyond what FastAPI derives from the routes: the upload
routes' request bodies, the answers' headers, each route's own error statuses, the API keys
as security schemes, and (in ``info.description``) what every route may answer because of
the layers below the routes.

The document is the contract a client is generated from, so each route lists the statuses
it can answer and no others (:func:`errors`), and ``tests/integration/test_openapi_contract.py``
validates real answers against the served document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from service.schemas import ErrorResponse

# ---------------------------------------------------------------------- what every route may answer
DESCRIPTION = """\
Anomaly scores and heatmaps from MSFlow models, batched per category.

**API keys.** When the server has keys (`MSFLOW_API_KEYS`, `MSFLOW_ADMIN_API_KEYS`,
`MSFLOW_REVIEWER_API_KEYS`), every `/v1` route needs one, as `X-API-Key: KEY` or
`Authorization: Bearer KEY` (401 `missing_api_key` / `invalid_api_key` otherwise). Reload,
thresholds and recent scores need an admin key; the review queue a reviewer or admin key
(403 `forbidden` for another valid key; 403 `admin_disabled` / `review_disabled` while no
such key is configured). `/healthz`, `/readyz` and `/metrics` need none. State-changing
requests a browser sends for another site are refused (403 `cross_site_refused`).

**Every answer** is JSON `{"error": {"code", "message", "details"?}}` when it is an error, and
carries `X-Request-ID`: the client's own when it sent a sane one (`[A-Za-z0-9._:-]{1,128}`),
else a new one.

**Answers of the layers below the routes**, possible on any route and not repeated on each:

| status | code | when |
| --- | --- | --- |
| 400 | `bad_request` | bytes that are not HTTP (connection closed) |
| 404 | `not_found` | no such route |
| 405 | `method_not_allowed` | the route has no such method |
| 408 | `request_timeout` | line and headers not in `MSFLOW_HEADER_TIMEOUT_S`, or the body not in `MSFLOW_REQUEST_DEADLINE_MS` after them (connection closed) |
| 413 | `request_too_large` | a body over 64 KiB to any route but the two upload routes |
| 429 | `too_many_pipelined_requests` | more than 16 requests pipelined on one connection (connection closed) |
| 431 | `header_too_large` | line and headers over `MSFLOW_MAX_HEADER_BYTES` (connection closed) |
| 500 | `internal_error` | an unexpected error (the request id names it in the log) |
| 503 | `too_many_connections` | past `MSFLOW_MAX_CONNECTIONS` open connections, `Retry-After: 1` (connection closed) |

The connection layer's answers (400, 408, 429, 431, 503 `too_many_connections`) come before
the app has seen the request: their `X-Request-ID` is always a new one.
"""

# ---------------------------------------------------------------------- headers
_STRING = {"type": "string"}
_NUMBER = {"type": "number"}

REQUEST_ID = {"X-Request-ID": {
    "description": "the request's id: the client's X-Request-ID when sane ([A-Za-z0-9._:-]{1,128}), else a new one; "
                   "the access log's line names it", "required": True, "schema": _STRING}}
RETRY_AFTER = {"Retry-After": {
    "description": "seconds before a retry may succeed: sent with queue_full, server_busy, model_not_loaded, "
                   "model_building, engine_unavailable, shutting_down, redis_unavailable, job_backlog_full, "
                   "export_busy; not with redis_required or review_store_unavailable (retrying will not help soon)",
    "required": False, "schema": {"type": "integer", "minimum": 0}}}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "Bearer", "schema": _STRING}}
LOCATION = {"Location": {"description": "/v1/jobs/<id>: poll it", "schema": _STRING}}
PNG_ANSWER = {
    "X-Anomaly-Score": {"description": "calibrated score in [0, 1]; 0.5 is the threshold", "schema": _NUMBER},
    "X-Raw-Score": {"description": "the engine's raw score", "schema": _NUMBER},
    "X-Threshold": {"description": "raw-score threshold (the ok bound) of the model that scored the image",
                    "schema": _NUMBER},
    "X-Is-Anomalous": {"description": "raw score >= threshold", "schema": {"type": "string", "enum": ["true", "false"]}},
    "X-Verdict": {"description": "ok, review or ng", "schema": {"type": "string", "enum": ["ok", "review", "ng"]}},
    "X-Ng-Threshold": {"description": "raw-score bound from which the verdict is ng", "schema": _NUMBER},
    "X-Model-Version": {"description": "the model version that scored the image", "schema": _STRING},
    "X-Engine": {"description": "the engine that ran it", "schema": _STRING},
    "X-Image-Size": {"description": "upright size of the upload, WIDTHxHEIGHT",
                     "schema": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}},
    "X-Heatmap-Size": {"description": "size of the PNG as rendered, WIDTHxHEIGHT",
                       "schema": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"}},
}

# ---------------------------------------------------------------------- error statuses, per route
_TITLES = {400: "Bad request", 401: "No valid API key", 403: "Refused", 404: "Not found", 406: "Not acceptable",
           408: "Request timeout", 409: "Conflict", 413: "Too large", 415: "Unsupported media type",
           422: "Invalid request", 500: "Server error", 503: "Unavailable", 504: "Deadline exceeded"}

UNAUTHORIZED = "`missing_api_key`, `invalid_api_key`"
INTERNAL = "`internal_error`"
BODY_TOO_LARGE = "`request_too_large` (a JSON body over 64 KiB)"


def errors(codes: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for a route's error statuses, each described by the codes it
    answers with (``{404: "`unknown_category`"}``); every route answers 500 ``internal_error``."""
    out: dict[int | str, dict[str, Any]] = {}
    for status, text in {**codes, 500: codes.get(500, INTERNAL)}.items():
        headers = dict(REQUEST_ID)
        if status == 401:
            headers.update(WWW_AUTHENTICATE)
        if status == 503:
            headers.update(RETRY_AFTER)
        out[status] = {"model": ErrorResponse, "description": f"{_TITLES[status]}: {text}", "headers": headers}
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def ok(description: str = "Successful Response", content: dict[str, Any] | None = None,
       headers: Mapping[str, Any] | None = None, status: int = 200) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry of a route's success answer: its X-Request-ID, and more headers
    or media types."""
    entry: dict[str, Any] = {"description": description, "headers": {**REQUEST_ID, **(headers or {})}}
    if content is not None:
        entry["content"] = content
    return {status: entry}


# ---------------------------------------------------------------------- the upload routes' bodies
_BINARY = {"type": "string", "format": "binary"}
_IMAGES = {"type": "array", "items": _BINARY}
RAW_IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "application/octet-stream")

UPLOAD = {
    "requestBody": {
        "required": True,
        "description": "The images: multipart/form-data with one or more parts named `files` or `file` (in order; "
                       "parts of other names are ignored, and none named so is 400 `bad_upload`), or one image as "
                       "the raw body with Content-Type `image/*` (any image type: the format is read from the "
                       "bytes; PNG, JPEG, BMP, TIFF and WEBP are accepted) or `application/octet-stream`. Anything "
                       "else is 415 `unsupported_media_type`.",
        "content": {
            # One part named so at least: the document admitted a form without any, which is 400.
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {**_IMAGES, "minItems": 1, "description": "one or more images"},
                "file": {**_IMAGES, "minItems": 1, "description": "the same, under the other accepted name"}},
                "anyOf": [{"required": ["files"]}, {"required": ["file"]}]}},
            **{media: {"schema": _BINARY} for media in RAW_IMAGE_TYPES},
        },
    },
    "parameters": [{"name": "X-Filename", "in": "header", "required": False, "schema": _STRING,
                    "description": "a raw body's file name, echoed as the result's filename (cut to 255 "
                                   "characters); multipart parts carry their own"}],
}

# ---------------------------------------------------------------------- API keys
SECURITY_SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                     "description": "an API key (MSFLOW_API_KEYS; admin and reviewer keys are valid too). "
                                    "A server without keys configured takes requests without one"},
    "BearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "the same key as `Authorization: Bearer KEY`"},
}
SECURITY = [{"ApiKeyHeader": []}, {"BearerAuth": []}]


_FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def install_openapi(app: FastAPI) -> None:
    """The document FastAPI builds, plus the key schemes on every ``/v1`` operation (not on the
    health routes, which need no key), less FastAPI's own 422 ``HTTPValidationError``.

    FastAPI adds that 422 to every route with a parameter, in a shape this API never answers
    (its 422 is the error shape, :mod:`service.api.errors`), and to routes whose parameters
    cannot fail validation (a string in the path). The routes that can answer 422 list it
    themselves (:func:`errors`)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                invalid = operation.get("responses", {}).get("422", {})
                if invalid.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref") == _FASTAPI_422:
                    del operation["responses"]["422"]
                if path.startswith("/v1/"):
                    operation["security"] = SECURITY
        components = schema.setdefault("components", {})
        if _FASTAPI_422 not in json.dumps(schema["paths"]):
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
        components["securitySchemes"] = SECURITY_SCHEMES
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
