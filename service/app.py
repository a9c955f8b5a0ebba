"""The HTTP API: ``create_app(settings)`` builds a FastAPI app around one :class:`ServiceState`.

Request path of ``POST /v1/inspect/{category}`` (see DESIGN.md): read the body under byte
limits -> decode in the thread pool (:mod:`service.imaging`) -> the category's
:class:`~service.batcher.Batcher` -> normalise with the manifest -> render heatmaps in the
thread pool (:mod:`service.render`) -> JSON, or the PNG itself for ``Accept: image/png``.

Every error, ours or FastAPI's, leaves as ``{"error": {"code", "message", "details"?}}``;
an unexpected exception is logged and answered 500 in that shape, and never takes the
server down.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.manifest import CATEGORY_PATTERN, ManifestError
from service.batcher import (Batcher, BatcherClosed, CallerGone, DeadlineExceeded, InputSizeChanged, ItemResult,
                             QueueFull, wait_results)
from service.config import Settings
from service.engines import EngineError
from service.imaging import (DecodedImage, ImageLimits, ImageRejected, Upload, configure_pillow, decode_image,
                             model_input, read_uploads)
from service.metrics import UNKNOWN, RequestMetricsMiddleware, ServiceMetrics
from service.registry import (LoadedModel, ModelNotLoaded, ModelRegistry, RegistryError, UnknownCategory,
                              VersionNotFound)
from service.render import heatmap_for
from service.schemas import (ErrorResponse, Health, Heatmap, HeatmapMode, HeatmapSize, ImageResult, ImageSize,
                             InspectResponse, ModelInfo, ModelList, Readiness, Timings)

log = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 406, 413, 415, 422, 500, 501, 503, 504)}
_T = TypeVar("_T")


class ApiError(Exception):
    """An error answer: HTTP status, stable machine-readable code, human message."""

    def __init__(self, status_code: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message, self.details, self.headers = (
            status_code, code, message, details, headers)


# ---------------------------------------------------------------------- runtime state
class ServiceState:
    """What the routes share: settings, metrics, registry, one batcher per category, the pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.registry = ModelRegistry(settings, on_swap=lambda m: self.metrics.set_model(
            m.category, m.version, m.engine.name))
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        self.shutting_down = False
        self._batchers: dict[str, Batcher] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._loading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check the store (fail start-up if unusable), then load engines in the background so
        /healthz answers while big engines load; /readyz says when all are warm."""
        configure_pillow(self.settings.max_image_pixels)
        self.registry.discover()
        self._pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self._loading = asyncio.create_task(self.registry.load_all(), name="load-models")

    def begin_shutdown(self) -> None:
        """Readiness goes 503 at once (called from the SIGTERM handler, so only sets a flag)."""
        self.shutting_down = True

    async def stop(self) -> None:
        """Drain: queued and running batches finish, then the threads go."""
        self.shutting_down = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await asyncio.gather(*(b.drain(self.settings.graceful_shutdown_s) for b in self._batchers.values()))
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def batcher(self, category: str) -> Batcher:
        # Created on first use, on the running loop. Not refused while only readiness is down
        # (shutdown_delay_s): load balancers may still route here until they notice.
        b = self._batchers.get(category)
        if b is None:
            s = self.settings
            b = Batcher(category, lambda: self.registry.engine(category), max_batch_size=s.max_batch_size,
                        max_queue_delay_s=s.max_queue_delay_ms / 1e3, max_queue_size=s.max_queue_size,
                        observer=self.metrics)
            self._batchers[category] = b
        return b

    async def run_blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def decode_all(self, category: str, uploads: Sequence[Upload]) -> list[DecodedImage]:
        size = self.registry.get(category).manifest.input_size

        async def one(index: int, upload: Upload) -> DecodedImage:
            try:
                image = await self.run_blocking(decode_image, upload.data, size, self.limits, upload.filename)
            except ImageRejected as exc:
                exc.details = {**(exc.details or {}), "index": index, "filename": upload.filename}
                raise
            self.metrics.observe_stage("decode", image.decode_ms / 1e3)
            return image

        results = await asyncio.gather(*(one(i, u) for i, u in enumerate(uploads)), return_exceptions=True)
        for r in results:  # the first failure in request order is the answer
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def score(self, category: str, images: list[DecodedImage], deadline: float,
                    request: Request) -> list[ItemResult]:
        """Queue every image; wait for all, the deadline, or the client leaving (then the
        images are dropped before the engine). Resubmits if a reload changed the input size."""
        results: dict[int, ItemResult] = {}
        todo = list(range(len(images)))
        for _ in range(3):
            size = self.registry.get(category).manifest.input_size
            tensors = [images[i].tensor if images[i].tensor.shape[0] == size else model_input(images[i].rgb, size)
                       for i in todo]
            futures = self.batcher(category).submit_many(tensors, deadline)
            try:
                await wait_results(futures, deadline, _disconnected(request))
            except DeadlineExceeded:
                self.metrics.count_rejection(category, "deadline")
                raise
            retry = []
            for i, fut in zip(todo, futures):
                if isinstance(fut.exception(), InputSizeChanged):
                    retry.append(i)
                else:
                    results[i] = fut.result()  # raises the item's error, if any
            if not retry:
                return [results[i] for i in range(len(images))]
            todo = retry
        raise ApiError(503, "model_changing", "the model changed repeatedly while the request waited; retry")

    async def reload(self, category: str, version: str | None) -> LoadedModel:
        try:
            model = await self.registry.reload(category, version)
        except Exception:
            self.metrics.reloads.labels(category, "failed").inc()
            raise
        self.metrics.reloads.labels(category, "ok").inc()
        return model


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is already read, so the next ASGI
    message can only be ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------- dependencies
def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def _key_in(key: str, keys: list[str]) -> bool:
    # Constant-time comparison against every key, so timing reveals neither key nor position.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, state: StateDep) -> None:
    """401 unless the API is open (no keys configured) or a valid key is presented."""
    s = state.settings
    if not s.api_keys:
        return
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "send an API key in X-API-Key or Authorization: Bearer")
    if not _key_in(key, s.api_keys + s.admin_api_keys):
        raise _unauthorized("invalid_api_key", "the API key is not valid")


def require_admin_key(request: Request, state: StateDep) -> None:
    """Admin routes need an admin key; with no keys configured at all the service is open."""
    s = state.settings
    if not s.admin_api_keys:
        if not s.api_keys:
            return
        raise ApiError(403, "admin_disabled", "no admin keys are configured (MSFLOW_ADMIN_API_KEYS)")
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "this route needs an admin API key")
    if not _key_in(key, s.admin_api_keys):
        if _key_in(key, s.api_keys):
            raise ApiError(403, "forbidden", "this route needs an admin API key")
        raise _unauthorized("invalid_api_key", "the API key is not valid")


def known_category(category: str, state: StateDep) -> str:
    """404 listing what exists for an unknown or malformed category (no path tricks reach the store)."""
    if CATEGORY_PATTERN.match(category) and category in state.registry.categories:
        return category
    raise _unknown(category, state.registry.categories)


def _unknown(category: str, known: list[str]) -> ApiError:
    return ApiError(404, "unknown_category", f"unknown category {category!r}; known: {', '.join(known) or 'none'}",
                    details={"categories": known})


Authed = Depends(require_api_key)
Admin = Depends(require_admin_key)
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


Rendered = tuple[bytes, tuple[int, int], float]  # PNG, (width, height), milliseconds


def _render(image: DecodedImage, scored: ItemResult, size: HeatmapSize, overlay: bool) -> Rendered:
    t0 = time.perf_counter()
    png, out_size = heatmap_for(scored.anomaly_map, scored.engine.manifest.calibration, image.tensor, image.rgb,
                                size.value, overlay)
    return png, out_size, (time.perf_counter() - t0) * 1e3


def _result(index: int, upload: Upload, image: DecodedImage, scored: ItemResult, heat: Rendered | None,
            started: float) -> ImageResult:
    # Threshold and version come from the engine that scored *this* image (reload-safe).
    cal = scored.engine.manifest.calibration
    heatmap = None if heat is None else Heatmap(data=base64.b64encode(heat[0]).decode("ascii"),
                                                width=heat[1][0], height=heat[1][1])
    return ImageResult(
        index=index, filename=upload.filename, score=round(cal.normalise_score(scored.raw_score), 6),
        raw_score=scored.raw_score, threshold=cal.threshold, is_anomalous=scored.raw_score >= cal.threshold,
        model_version=scored.engine.manifest.version, batch_size=scored.batch_size, heatmap=heatmap,
        timings_ms=Timings(decode=round(image.decode_ms, 3), queue=round(scored.queue_ms, 3),
                           engine=round(scored.engine_ms, 3), render=round(heat[2], 3) if heat else 0.0,
                           total=round((time.monotonic() - started) * 1e3, 3)),
        image_size=ImageSize(width=image.size[0], height=image.size[1]),
    )


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

    @app.post("/v1/inspect/{category}", response_model=InspectResponse, dependencies=[Authed],
              responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def inspect(request: Request, category: CategoryDep, state: StateDep,
                      heatmap: HeatmapMode = HeatmapMode.inline, overlay: bool = False,
                      heatmap_size: HeatmapSize = HeatmapSize.model) -> Response:
        started: float = request.scope["state"]["started"]
        deadline = started + state.settings.request_deadline_ms / 1e3
        if heatmap is HeatmapMode.url:
            raise ApiError(501, "not_implemented", "heatmap=url needs the Redis heatmap store, which this "
                           "version does not have yet; use heatmap=inline or heatmap=none")
        wants_png, json_ok = _wants_png(request.headers.get("accept"))
        state.registry.get(category)  # 503 now if the model is still loading, before reading the body
        s = state.settings
        uploads = await read_uploads(request, s.max_files_per_request, s.max_upload_bytes, s.max_request_bytes)
        if wants_png and len(uploads) != 1:
            if not json_ok:
                raise ApiError(406, "not_acceptable", "an image/png answer needs exactly one image; "
                               f"this request has {len(uploads)}")
            wants_png = False
        images = await state.decode_all(category, uploads)
        scored = await state.score(category, images, deadline, request)
        heats: list[Rendered | None] = [None] * len(images)
        if wants_png or heatmap is HeatmapMode.inline:
            heats = list(await asyncio.gather(*(state.run_blocking(_render, im, sc, heatmap_size, overlay)
                                               for im, sc in zip(images, scored))))
        results = [_result(i, up, im, sc, heats[i], started)
                   for i, (up, im, sc) in enumerate(zip(uploads, images, scored))]
        for r, h in zip(results, heats):
            state.metrics.count_image(category, r.is_anomalous)
            if h is not None:
                state.metrics.observe_stage("render", h[2] / 1e3)
        if wants_png:
            return _png_response(results[0], heats[0], scored[0].engine.name)  # type: ignore[arg-type]
        body = InspectResponse(request_id=request.scope["state"]["request_id"], category=category,
                               model_version=scored[0].engine.manifest.version, engine=scored[0].engine.name,
                               results=results)
        return JSONResponse(body.model_dump(mode="json"))

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
        return Readiness(models=state.registry.serving())

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
    EngineError: (500, "engine_error", False),
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
