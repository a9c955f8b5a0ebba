"""The HTTP API: ``create_app(settings)`` builds a FastAPI app around one :class:`ServiceState`.

Request path of ``POST /v1/inspect/{category}`` (see DESIGN.md): read the body under byte
limits -> result cache (Redis, per image) -> decode in the thread pool
(:mod:`service.imaging`) -> the category's :class:`~service.batcher.Batcher` -> normalise
with the manifest and render heatmaps (:mod:`service.results`) -> JSON, or the PNG itself
for ``Accept: image/png``. Shared state is :class:`~service.state.ServiceState`; API keys
are :mod:`service.auth`.

With Redis (``MSFLOW_REDIS_URL``): ``heatmap=url`` links (``GET /v1/heatmaps/<id>.png``),
the result cache, and async jobs (``POST /v1/jobs/<category>``, ``GET /v1/jobs/<id>``,
run by ``msflow worker``). Without it, or while it is down, inspection keeps working:
no cache, links served from this process's memory, jobs 503.

Every error, ours or FastAPI's, leaves as ``{"error": {"code", "message", "details"?}}``;
an unexpected exception is logged and answered 500 in that shape, and never takes the
server down.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.manifest import CATEGORY_PATTERN, ManifestError
from service.auth import Admin, Authed, require_admin_key, require_api_key
from service.batcher import BatcherClosed, CallerGone, DeadlineExceeded, QueueFull
from service.config import Settings
from service.console import install_console
from service.engines import EngineError
from service.errors import ApiError
from service.imaging import ImageRejected, read_uploads
from service.metrics import UNKNOWN, RequestMetricsMiddleware
from service.redisconn import RedisUnavailable
from service.registry import ModelNotLoaded, RegistryError, UnknownCategory, VersionNotFound
from service.results import InspectOptions, Rendered
from service.schemas import (ErrorResponse, Health, HeatmapMode, HeatmapSize, ImageResult, InspectResponse,
                             JobAccepted, JobStatus, ModelInfo, ModelList, Readiness)
from service.state import ServiceState, StateDep, get_state

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 406, 413, 415, 422, 500, 501, 503, 504)}


# ---------------------------------------------------------------------- dependencies
def known_category(category: str, state: StateDep) -> str:
    """404 listing what exists for an unknown or malformed category (no path tricks reach the store)."""
    if CATEGORY_PATTERN.match(category) and category in state.registry.categories:
        return category
    raise _unknown(category, state.registry.categories)


def _unknown(category: str, known: list[str]) -> ApiError:
    return ApiError(404, "unknown_category", f"unknown category {category!r}; known: {', '.join(known) or 'none'}",
                    details={"categories": known})


CategoryDep = Annotated[str, Depends(known_category)]


# ---------------------------------------------------------------------- inspection
def _wants_png(accept: str | None) -> tuple[bool, bool]:
    """(png preferred, json acceptable) from an Accept header; JSON wins ties and absence."""
    if not accept:
        return False, True
    best = {"png": (0.0, -1), "json": (0.0, -1)}
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        for kind, exact, family in (("png", "image/png", "image/*"), ("json", "application/json", "application/*")):
            spec = 2 if media == exact else 1 if media == family else 0 if media == "*/*" else -1
            if spec >= 0 and (q, spec) > best[kind]:
                best[kind] = (q, spec)
    return best["png"][0] > 0 and best["png"] > best["json"], best["json"][0] > 0


def _png_response(result: ImageResult, heat: Rendered, engine: str) -> Response:
    return Response(heat[0], media_type="image/png", headers={
        "X-Anomaly-Score": f"{result.score:.6f}", "X-Raw-Score": f"{result.raw_score:.6f}",
        "X-Threshold": f"{result.threshold:.6f}", "X-Is-Anomalous": str(result.is_anomalous).lower(),
        "X-Model-Version": result.model_version, "X-Engine": engine,
        "X-Image-Size": f"{result.image_size.width}x{result.image_size.height}"})


# ---------------------------------------------------------------------- app
def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; engines load in the lifespan (``/readyz`` turns 200 once all are warm)."""
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="MSFlow inspection service", version="1", lifespan=lifespan,
                  description="Anomaly scores and heatmaps from MSFlow models, batched per category.")
    app.state.service = state
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    _install_error_handlers(app)
    install_console(app)  # GET / (operator console), model assets, threshold overrides, recent scores

    @app.post("/v1/inspect/{category}", response_model=InspectResponse, dependencies=[Authed],
              responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def inspect(request: Request, category: CategoryDep, state: StateDep,
                      heatmap: HeatmapMode = HeatmapMode.inline, overlay: bool = False,
                      heatmap_size: HeatmapSize = HeatmapSize.model) -> Response:
        started: float = request.scope["state"]["started"]
        deadline = started + state.settings.request_deadline_ms / 1e3
        wants_png, json_ok = _wants_png(request.headers.get("accept"))
        state.registry.get(category)  # 503 now if the model is still loading, before reading the body
        s = state.settings
        uploads = await read_uploads(request, s.max_files_per_request, s.max_upload_bytes, s.max_request_bytes)
        if wants_png and len(uploads) != 1:
            if not json_ok:
                raise ApiError(406, "not_acceptable", "an image/png answer needs exactly one image; "
                               f"this request has {len(uploads)}")
            wants_png = False
        options = InspectOptions(heatmap=heatmap, overlay=overlay, heatmap_size=heatmap_size)
        answer = await state.inspect(request, category, uploads, options, deadline, started, wants_png)
        if wants_png:
            return _png_response(answer.results[0], answer.heats[0], answer.engines[0])  # type: ignore[arg-type]
        body = InspectResponse(request_id=request.scope["state"]["request_id"], category=category,
                               model_version=answer.results[0].model_version, engine=answer.engines[0],
                               results=answer.results)
        return JSONResponse(body.model_dump(mode="json"))

    @app.get("/v1/heatmaps/{heatmap_id}.png", dependencies=[Authed], response_class=Response,
             responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def get_heatmap(heatmap_id: str, state: StateDep) -> Response:
        """The PNG of a ``heatmap=url`` result, until its link expires (``heatmap_ttl_s``)."""
        png = await state.links.get(heatmap_id)
        if png is None:
            raise ApiError(404, "heatmap_not_found", "no such heatmap: the link expired or never existed")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    @app.post("/v1/jobs/{category}", status_code=202, response_model=JobAccepted, dependencies=[Authed],
              responses=ERRORS)
    async def submit_job(request: Request, category: CategoryDep, state: StateDep,
                         heatmap: HeatmapMode = HeatmapMode.inline, overlay: bool = False,
                         heatmap_size: HeatmapSize = HeatmapSize.model) -> Response:
        """Queue an inspection for ``msflow worker`` (needs Redis); poll the ``Location``."""
        queue = state.require_jobs()  # 503 before reading the body when there is no Redis
        s = state.settings
        uploads = await read_uploads(request, s.max_files_per_request, s.max_upload_bytes, s.max_request_bytes)
        await state.check_uploads(uploads)
        options = InspectOptions(heatmap=heatmap, overlay=overlay, heatmap_size=heatmap_size)
        record = await queue.submit(category, uploads, options, request.scope["state"]["request_id"])
        state.metrics.jobs.labels(category, "queued").inc()
        location = f"/v1/jobs/{record.id}"
        body = JobAccepted(id=record.id, category=category, images=len(uploads), url=location)
        return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": location})

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=[Authed], responses=ERRORS)
    async def get_job(job_id: str, state: StateDep) -> JobStatus:
        record = await state.require_jobs().records.get(job_id)
        if record is None:
            raise ApiError(404, "job_not_found", "no such job: it expired or never existed")
        return JobStatus(id=record.id, status=record.status, category=record.category, created_at=record.created_at,
                         updated_at=record.updated_at, attempts=record.attempts, worker=record.worker,
                         result=record.result, error=record.error)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Authed], responses=ERRORS)
    async def list_models(state: StateDep) -> ModelList:
        return ModelList(models=state.registry.describe_all(), failed=state.registry.failed)

    @app.get("/v1/models/{category}", response_model=ModelInfo, dependencies=[Authed], responses=ERRORS)
    async def get_model(category: CategoryDep, state: StateDep) -> ModelInfo:
        return state.registry.describe(category)

    @app.post("/v1/models/{category}/reload", response_model=ModelInfo, dependencies=[Admin], responses=ERRORS)
    async def reload_model(category: str, state: StateDep,
                           version: Annotated[str | None, Query(max_length=64)] = None) -> ModelInfo:
        """Load the newest (or pinned, or given) version, warm it, then swap; on failure the
        previous version keeps serving."""
        if not CATEGORY_PATTERN.match(category):
            raise _unknown(category, state.registry.categories)
        try:
            await state.reload(category, version)
        except UnknownCategory:
            raise
        except VersionNotFound as exc:
            raise ApiError(404, "version_not_found", str(exc)) from exc
        except Exception as exc:
            log.error("reload of %s failed: %s", category, exc)
            status = 422 if isinstance(exc, (RegistryError, ManifestError)) else 500
            raise ApiError(status, "reload_failed", f"reload of {category} failed; the previous version keeps "
                           f"serving: {exc}") from exc
        return state.registry.describe(category)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": ErrorResponse}})
    async def readyz(state: StateDep) -> Readiness:
        if state.shutting_down:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        if not state.registry.ready:
            raise ApiError(503, "not_ready", "not every model is loaded and warm",
                           details={"serving": state.registry.serving(), "failed": state.registry.failed})
        # Redis is reported, never a reason to leave rotation: inspection works without it.
        return Readiness(models=state.registry.serving(), redis=await state.redis_status())

    @app.get("/metrics", include_in_schema=False)
    async def metrics(state: StateDep) -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    return app


# ---------------------------------------------------------------------- errors
def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}
# Library exceptions -> (status, code, Retry-After?)
_MAPPED: dict[type[Exception], tuple[int, str, bool]] = {
    QueueFull: (503, "queue_full", True), BatcherClosed: (503, "shutting_down", True),
    ModelNotLoaded: (503, "model_not_loaded", True), DeadlineExceeded: (504, "deadline_exceeded", False),
    EngineError: (500, "engine_error", False), RedisUnavailable: (503, "redis_unavailable", True),
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, exc: ImageRejected) -> JSONResponse:
        get_state(request).metrics.count_rejection(request.path_params.get("category", UNKNOWN), exc.code)
        return error_response(exc.status_code, exc.code, exc.message, exc.details)

    async def mapped(request: Request, exc: Exception) -> JSONResponse:
        status, code, retry = next(v for k, v in _MAPPED.items() if isinstance(exc, k))
        headers = {"Retry-After": str(get_state(request).settings.retry_after_s)} if retry else None
        return error_response(status, code, str(exc), headers=headers)

    for exc_type in _MAPPED:
        app.add_exception_handler(exc_type, mapped)  # type: ignore[arg-type]

    @app.exception_handler(CallerGone)
    async def caller_gone(request: Request, exc: CallerGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(UnknownCategory)
    async def unknown(request: Request, exc: UnknownCategory) -> JSONResponse:
        e = _unknown(exc.category, exc.known)
        return error_response(e.status_code, e.code, e.message, e.details)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                   for e in exc.errors()]
        message = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
        return error_response(422, "invalid_request", message, details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's outermost middleware calls this, sends the answer, then re-raises so
        # uvicorn logs the traceback; the connection and the server carry on.
        request_id = request.scope.get("state", {}).get("request_id", "?")
        return error_response(500, "internal_error", f"unexpected server error (request {request_id})",
                              headers={"X-Request-ID": request_id})


__all__ = ["ApiError", "ServiceState", "create_app", "error_response", "get_state", "require_admin_key",
           "require_api_key"]
