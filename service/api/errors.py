"""Domain errors -> HTTP: the only place that maps them. Every error, ours or FastAPI's,
leaves as ``{"error": {"code", "message", "details"?}}``; an unexpected exception is
logged and answered 500 in that shape, and never takes the server down."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount

from models.review_store import ItemNotFound, ReviewError
from service.api.security_headers import EVERY_ANSWER_HEADERS
from service.engines.base import EngineError
from service.metrics import UNKNOWN
from service.pipeline.admission import AdmissionRefused
from service.pipeline.batch_queue import BatcherClosed, CallerGone, DeadlineExceeded, QueueFull
from service.pipeline.decode import ImageRejected
from service.pipeline.engine_client import EngineUnavailable
from service.pipeline.registry_errors import ModelNotLoaded, UnknownCategory
from service.pipeline.postprocess import NonFiniteOutput
from service.pipeline.state import JobsUnavailable
from service.pipeline.thresholds import BoundsInverted, ThresholdNotPersisted, ThresholdOutOfRange
from service.redisq.connection import RedisUnavailable
from service.redisq.jobs import BacklogFull, IdempotencyConflict, IdempotentJobUnreadable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP status, stable machine-readable code, human message."""

    def __init__(self, status_code: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message, self.details, self.headers = (
            status_code, code, message, details, headers)


def unknown_category_error(category: str, known: list[str], removed: str | None = None) -> ApiError:
    """``removed``: why, for a category the store watch retired (its folder left the store)."""
    return ApiError(404, "unknown_category", f"unknown category {category!r}{f': {removed}' if removed else ''}; "
                    f"known: {', '.join(known) or 'none'}", details={"categories": known})


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str | None:
    """Every method a route serves at this request's path, for a 405's ``Allow`` (None: no
    route does; a mount's own answer stands). Starlette names those of the first route whose
    path matched, and FastAPI makes a route per method: the threshold route's 405 said ``GET``
    (PUT and DELETE serve too), and ``/v1/jobs/{id}``'s said ``POST`` (the submit route's
    ``/v1/jobs/{category}`` matches its path first). Each method is tried on the app's routes
    (FastAPI's included routers hold theirs inside); only a 405 pays for it."""
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]  # a mount takes any method
    probe = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", ""),
             "headers": [], "query_string": b""}
    methods = [m for m in _METHODS if any(r.matches({**probe, "method": m})[0] is Match.FULL for r in routes)]
    return ", ".join(methods) or None


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The API's error shape (also written below the app: :mod:`service.api.connections`)."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}
# Failures whose text is internal (an engine runtime's message, a Redis address, a file
# path): the client gets this fixed message and the request id; the text goes to the log.
_PUBLIC_MESSAGES: dict[type[Exception], str] = {
    EngineError: "the engine failed on this image's batch",
    RedisUnavailable: "Redis is unavailable; retry later",
    ThresholdNotPersisted: "the threshold change could not be persisted; nothing changed",
}
# Library exceptions -> (status, code, Retry-After?)
_MAPPED: dict[type[Exception], tuple[int, str, bool]] = {
    QueueFull: (503, "queue_full", True), BatcherClosed: (503, "shutting_down", True),
    ModelNotLoaded: (503, "model_not_loaded", True), EngineUnavailable: (503, "engine_unavailable", True), DeadlineExceeded: (504, "deadline_exceeded", False),
    EngineError: (500, "engine_error", False), RedisUnavailable: (503, "redis_unavailable", True),
    JobsUnavailable: (503, "redis_required", False), BacklogFull: (503, "job_backlog_full", True),
    IdempotencyConflict: (409, "idempotency_key_reused", False),
    IdempotentJobUnreadable: (500, "job_record_unreadable", False),  # as its GET answers
    ThresholdNotPersisted: (500, "threshold_not_persisted", False),
}


# FastAPI's answer when reading a JSON body fails other than as malformed JSON: bytes that are
# not UTF-8 (a Latin-1 note), nesting past the decoder's recursion limit, the client gone.
FASTAPI_BODY_ERROR = "There was an error parsing the body"
MAX_VALIDATION_ERRORS = 16  # a 422's details (and message) name at most these, then the count left


def unparsable_body(cause: BaseException | None) -> Response:
    """What a JSON body FastAPI could not read answers: 422 ``invalid_request``, as malformed
    JSON does (it was 400 ``bad_request``, a status no route with a body documents, with a
    message that said neither what nor where), or 499 for a client gone mid-body."""
    if isinstance(cause, ClientDisconnect):
        return Response(status_code=499)
    if isinstance(cause, UnicodeDecodeError):
        why = f"not UTF-8 (byte {cause.start}: {cause.object[cause.start:cause.start + 1]!r})"
    elif isinstance(cause, RecursionError):
        why = "nested too deeply"
    else:
        why = type(cause).__name__ if cause is not None else "unreadable"
    message = f"body: not a JSON document: {why}"
    return error_response(422, "invalid_request", message, [{"loc": ["body"], "msg": message, "type": "json_invalid"}])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, exc: ImageRejected) -> JSONResponse:
        request.app.state.service.metrics.count_rejection(request.path_params.get("category", UNKNOWN), exc.code)
        return error_response(exc.status_code, exc.code, exc.message, exc.details)

    async def mapped(request: Request, exc: Exception) -> JSONResponse:
        status, code, retry = next(v for k, v in _MAPPED.items() if isinstance(exc, k))
        headers = {"Retry-After": str(request.app.state.service.settings.retry_after_s)} if retry else None
        public = next((m for k, m in _PUBLIC_MESSAGES.items() if isinstance(exc, k)), None)
        if public is None:
            return error_response(status, code, str(exc), headers=headers)
        request_id = request.scope.get("state", {}).get("request_id", "?")
        log.warning("request %s: %s: %s", request_id, code, exc)
        return error_response(status, code, f"{public} (request {request_id}; details in the server log)",
                              headers=headers)

    for exc_type in _MAPPED:
        app.add_exception_handler(exc_type, mapped)  # type: ignore[arg-type]

    @app.exception_handler(AdmissionRefused)
    async def refused(request: Request, exc: AdmissionRefused) -> JSONResponse:
        # Counted by the runtime (reason = exc.code), but for a refusal met while reading the body
        # (the upload byte budget), counted here under its own reason. 503: the budget frees as
        # answers leave.
        if exc.reason is not None:
            request.app.state.service.metrics.count_rejection(request.path_params.get("category", UNKNOWN), exc.reason)
        headers = ({"Retry-After": str(request.app.state.service.settings.retry_after_s)}
                   if exc.status_code == 503 else None)
        return error_response(exc.status_code, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(NonFiniteOutput)
    async def non_finite(request: Request, exc: NonFiniteOutput) -> JSONResponse:
        return error_response(500, exc.code, str(exc), exc.details)

    @app.exception_handler(ThresholdOutOfRange)
    async def out_of_range(request: Request, exc: ThresholdOutOfRange) -> JSONResponse:
        return error_response(422, "threshold_out_of_range", str(exc), exc.details)

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, exc: ReviewError) -> JSONResponse:
        if isinstance(exc, ItemNotFound):
            return error_response(404, "review_item_not_found", str(exc))
        return error_response(422, "invalid_label", str(exc))

    @app.exception_handler(BoundsInverted)
    async def bounds_inverted(request: Request, exc: BoundsInverted) -> JSONResponse:
        return error_response(422, "invalid_bounds", str(exc), exc.details)

    @app.exception_handler(CallerGone)
    @app.exception_handler(ClientDisconnect)  # gone while its body was arriving: not our error
    async def caller_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(UnknownCategory)
    async def unknown(request: Request, exc: UnknownCategory) -> JSONResponse:
        e = unknown_category_error(exc.category, exc.known, exc.removed)
        return error_response(e.status_code, e.code, e.message, e.details)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The first few: a 62 KB body of 7,000 unknown keys was answered 915 KB, each error twice.
        errors = exc.errors()
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                   for e in errors[:MAX_VALIDATION_ERRORS]]
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
        if len(errors) > len(details):
            message += f" (and {len(errors) - len(details)} more)"
        return error_response(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
            return unparsable_body(exc.__cause__)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allowed := allowed_methods(request)) is not None:
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's outermost middleware calls this, sends the answer, then re-raises so
        # uvicorn logs the traceback; the connection and the server carry on.
        request_id = request.scope.get("state", {}).get("request_id", "?")
        # Outside every middleware of ours: the request id and the security headers written here.
        return error_response(500, "internal_error", f"unexpected server error (request {request_id})",
                              headers={"X-Request-ID": request_id, **EVERY_ANSWER_HEADERS})
