"""Liveness (``/healthz``), readiness (``/readyz``) and Prometheus ``/metrics``."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import Response

from service.api.deps import StateDep
from service.api.errors import ApiError
from service.api.openapi import REQUEST_ID, ok
from service.metrics_buffer import FLUSH_TOPIC
from service.pipeline.engine_errors import EngineUnavailable
from service.pipeline.state import ServiceState
from service.redisq.connection import RedisUnavailable
from service.schemas import ErrorResponse, Health, Readiness

log = logging.getLogger(__name__)

router = APIRouter()

# What a scrape may spend reading the job gauges from Redis: Prometheus's scrape timeout is
# 10 s by default, and a /metrics that hung on a stalled Redis would lose every other series.
JOB_CENSUS_TIMEOUT_S = 0.5
# What a scrape waits for the other processes to write their buffered metric values (each does
# it on its event loop: milliseconds); one stuck longer is read as its files are.
METRICS_FLUSH_TIMEOUT_S = 1.0


@router.get("/healthz", response_model=Health, responses={
    **ok("Alive"),
    503: {"model": ErrorResponse, "headers": REQUEST_ID,
          "description": "`engine_stalled`: one process whose engine has not returned from a batch for "
                         "`MSFLOW_ENGINE_STALL_S` (only a restart gets it back)"}})
async def healthz(state: StateDep) -> Health:
    # One process: a call that never returns (a wedged GPU) holds its engine thread for good,
    # and only a restart frees it: liveness fails, so the orchestrator restarts it. A front
    # end of several stays alive: the engine process's own watch restarts that process.
    if state.engine_link is None:
        _refuse_if_stalled(state)
    return Health()


def _refuse_if_stalled(state: ServiceState) -> None:
    stalled = state.engine_stalled()
    if stalled:
        worst = max(stalled.values())
        raise ApiError(503, "engine_stalled", f"the engine has not answered for {worst:.0f} s (over "
                       f"MSFLOW_ENGINE_STALL_S={state.settings.engine_stall_s:g} s): a call that never returns, "
                       "or an engine process not running", details={"stalled_s": {c: round(s, 1)
                                                                                   for c, s in stalled.items()}})


@router.get("/readyz", response_model=Readiness, responses={
    **ok("Ready: every category serves, or failed and is skipped"),
    503: {"model": ErrorResponse, "headers": REQUEST_ID,
          "description": "Not ready: `shutting_down`, `engine_unavailable`, `engine_stalled`, `not_ready` "
                         "(no Retry-After)"}})
async def readyz(state: StateDep) -> Readiness:
    if state.shutting_down:
        raise ApiError(503, "shutting_down", "the server is shutting down")
    if not state.engine_connected:
        raise ApiError(503, "engine_unavailable", "this front end has lost the engine process; it is reconnecting")
    _refuse_if_stalled(state)
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
    await _refresh_job_gauges(state)
    await _flush_other_processes(state)
    body, content_type = await state.metrics.exposition_off_loop()
    return Response(body, media_type=content_type)


async def _flush_other_processes(state: ServiceState) -> None:
    """Multi-process mode: the engine process and every other front end write their buffered
    metric values (service/metrics_buffer.py) before this one reads the files; those that do not
    answer within METRICS_FLUSH_TIMEOUT_S (or no engine process) are read as their files are."""
    if state.engine_link is None:
        return
    try:
        async with asyncio.timeout(METRICS_FLUSH_TIMEOUT_S):
            await state.engine_link.collect(FLUSH_TOPIC, {})
    except (EngineUnavailable, TimeoutError) as exc:
        log.debug("metrics read without every process's latest values: %s", exc or "timed out")


async def _refresh_job_gauges(state: ServiceState) -> None:
    """``msflow_job_workers`` and ``msflow_job_backlog`` of every category in the store, from
    Redis now (one round trip). A job's 202 said ``workers: 0`` to its client, and nothing said
    it to monitoring. Through the jobs' connection, which has no circuit breaker: a slow
    scrape must not turn Redis off for the hot path. Redis down or slow: the gauges keep their
    last values, the failure counts in ``msflow_redis_errors_total{operation="job_census"}``,
    and the scrape answers. No Redis configured: no jobs, no series."""
    queue = state.jobs
    if queue is None:
        return
    try:
        census = await queue.workers.census({c: queue.stream(c) for c in state.registry.categories},
                                            JOB_CENSUS_TIMEOUT_S)
    except RedisUnavailable as exc:
        log.debug("job gauges not refreshed: %s", exc)
        return
    for category, jobs in census.items():
        state.metrics.set_job_census(category, jobs.workers, jobs.backlog)
