"""The HTTP API: ``create_app(settings)`` builds a FastAPI app around one :class:`ServiceState`.

Request path of ``POST /v1/inspect/{category}`` (see docs/DESIGN.md): read the body under byte
limits -> result cache (Redis, per image) -> decode in the thread pool
(:mod:`service.pipeline.decode`) -> the category's :class:`~service.pipeline.batcher.Batcher` -> normalise
with the manifest and render heatmaps (:mod:`service.pipeline.postprocess`) -> JSON, or the PNG itself
for ``Accept: image/png``. Shared state is :class:`~service.pipeline.state.ServiceState`; API keys
are :mod:`service.api.auth`.

With Redis (``MSFLOW_REDIS_URL``): ``heatmap=url`` links (``GET /v1/heatmaps/<id>.png``),
the result cache, and async jobs (``POST /v1/jobs/<category>``, ``GET /v1/jobs/<id>``,
run by ``msflow worker``). Without it, or while it is down, inspection keeps working:
no cache, links served from this process's memory, jobs 503.

Every error, ours or FastAPI's, leaves as ``{"error": {"code", "message", "details"?}}``;
an unexpected exception is logged and answered 500 in that shape, and never takes the
server down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import health, inspect, jobs, models, review
from service.api.body_limits import BodyLimitMiddleware, UploadBytes
from service.api.console import install_console
from service.api.errors import install_error_handlers
from service.config import Settings
from service.api.docs import install_docs
from service.api.openapi import DESCRIPTION, install_openapi
from service.api.request_metrics import RequestMetricsMiddleware
from service.api.security_headers import SecurityHeadersMiddleware
from service.pipeline.state import ServiceState


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

    # redirect_slashes off: a path with a slash too many or too few is 404, not a 307 whose
    # Location Starlette builds from Host and scheme (behind a TLS proxy that does not forward
    # the scheme, a client following it sent its key again over plain HTTP).
    app = FastAPI(title="MSFlow inspection service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description=DESCRIPTION, redirect_slashes=False)
    app.state.service = state
    # Inside the metrics: its 413s are counted and carry a request id.
    uploads = UploadBytes(settings.max_inflight_upload_bytes, on_change=state.metrics.upload_bytes.labels("held").set)
    state.metrics.upload_bytes.labels("held").set(0)
    state.metrics.upload_bytes.labels("budget").set(settings.max_inflight_upload_bytes)
    app.add_middleware(BodyLimitMiddleware, uploads=uploads)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: on every answer, error handler's included
    install_error_handlers(app)
    # Routes are tried in the order they are added, each match costing a few microseconds of
    # the event loop: inspection first (its requests are nearly all of them), pages last.
    for area in (inspect, jobs, models, review, health):
        app.include_router(area.router)
    install_console(app)  # GET / (operator console), model assets, threshold overrides, recent scores
    install_docs(app)  # /docs with local assets (FastAPI's own page loads them from a CDN)
    install_openapi(app)  # /openapi.json: key schemes, headers, bodies beyond what FastAPI derives
    return app
