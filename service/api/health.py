"""Liveness (``/healthz``), readiness (``/readyz``) and Prometheus ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import StateDep
from service.api.errors import ApiError
from service.api.openapi import REQUEST_ID, ok
from service.schemas import ErrorResponse, Health, Readiness

router = APIRouter()


@router.get("/healthz", response_model=Health, responses=ok("Alive"))
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses={
    **ok("Ready: every category serves, or failed and is skipped"),
    503: {"model": ErrorResponse, "headers": REQUEST_ID,
          "description": "Not ready: `shutting_down`, `engine_unavailable`, `not_ready` (no Retry-After)"}})
async def readyz(state: StateDep) -> Readiness:
    if state.shutting_down:
        raise ApiError(503, "shutting_down", "the server is shutting down")
    if not state.engine_connected:
        raise ApiError(503, "engine_unavailable", "this front end has lost the engine process; it is reconnecting")
    if not state.registry.ready:
        raise ApiError(503, "not_ready", "no model is serving yet, or some are still loading",
                       details={"serving": state.registry.serving(), "failed": state.registry.failed,
                                "categories": state.registry.status()})
    # Redis is reported, never a reason to leave rotation: inspection works without it.
    return Readiness(models=state.registry.serving(), categories=state.registry.status(),
                     failed=state.registry.failed, unhealthy=state.registry.unhealthy,
                     redis=await state.redis_status())


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)
