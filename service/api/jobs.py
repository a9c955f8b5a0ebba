"""Async jobs: ``POST /v1/jobs/{category}`` queues for ``msflow worker`` (needs Redis),
``GET /v1/jobs/{id}`` polls."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response

from service.api.auth import Authed, KeyFirstRoute, NotCrossSite, client_scope
from service.api.deps import InspectCategoryDep, StateDep
from service.api.errors import ApiError
from service.api.openapi import LOCATION, UNAUTHORIZED, UPLOAD, errors, ok
from service.api.uploads import read_uploads
from service.redisq.connection import RedisUnavailable
from service.redisq.jobs import JobQueue
from service.redisq.records import FINAL_STATES, JobRecord, Unreadable
from service.schemas import HeatmapMode, HeatmapSize, InspectOptions, JobAccepted, JobStatus

router = APIRouter(route_class=KeyFirstRoute)

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

_REDIS_DOWN = "`redis_unavailable` (Retry-After)"


def _idempotency_key_schema(schema: dict[str, Any]) -> None:
    """The header's schema: a string of :data:`IDEMPOTENCY_KEY` (checked by the route, which
    answers 400 ``bad_idempotency_key``), not pydantic's "string or null" of an optional
    parameter (a header is absent, never null)."""
    schema.pop("anyOf", None)
    schema.update(type="string", pattern=IDEMPOTENCY_KEY.pattern, minLength=1, maxLength=128)


async def _workers_alive(queue: JobQueue, record: JobRecord) -> int | None:
    """For an unfinished job: how many workers consume its category (with none alive a queued
    job said "queued" until it expired, like one in a long queue). None once it is finished,
    or when Redis fails now: a submission already queued must not answer 503 (its client would
    send the job again)."""
    if record.status in FINAL_STATES:
        return None
    try:
        return await queue.workers.alive(record.category)
    except RedisUnavailable:
        return None


# The key before the cross-site guard: where keys are configured a request without one is 401.
@router.post("/v1/jobs/{category}", status_code=202, response_model=JobAccepted, dependencies=[Authed, NotCrossSite],
             openapi_extra=UPLOAD, responses={
                 **ok("Queued", headers=LOCATION, status=202),
                 **errors({400: "`bad_upload`, `bad_idempotency_key`", 401: UNAUTHORIZED, 403: "`cross_site_refused`",
                           404: "`unknown_category`",
                           408: "`request_timeout`: the body did not arrive within MSFLOW_REQUEST_DEADLINE_MS of "
                                "the headers (the connection closes)",
                           409: "`idempotency_key_reused`: the Idempotency-Key named a job of another request "
                                "(other images, file names or options)",
                           413: "`image_too_large`, `request_too_large`, `too_many_files`, `too_many_pixels`",
                           415: "`unsupported_media_type`",
                           500: "`job_record_unreadable`: the Idempotency-Key's job has a stored record this "
                                "version cannot read (its request cannot be compared; use a new key)",
                           422: "`invalid_request` (query parameters), `undecodable_image` and the other refusals "
                                "of an image's header",
                           503: "`redis_required` (no Redis configured: no Retry-After), " + _REDIS_DOWN +
                                ", `job_backlog_full`, `model_not_loaded`, `model_building` (Retry-After)"})})
async def submit_job(request: Request, category: InspectCategoryDep, state: StateDep,
                     heatmap: HeatmapMode = HeatmapMode.inline, overlay: bool = False,
                     heatmap_size: HeatmapSize = HeatmapSize.model,
                     idempotency_key: Annotated[str | None, Header(
                         description="the same key (per category) gives the same job: resubmit after a lost answer "
                                     "without queuing the job twice; the key with another request (other images, "
                                     "names or options) is 409 idempotency_key_reused; 1 to 128 of A-Z a-z 0-9 _ . : - "
                                     "(else 400 bad_idempotency_key)",
                         json_schema_extra=_idempotency_key_schema,
                     )] = None) -> Response:
    """Queue an inspection for ``msflow worker`` (needs Redis); poll the ``Location``."""
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise ApiError(400, "bad_idempotency_key", "Idempotency-Key: 1 to 128 of A-Z a-z 0-9 _ . : -")
    queue = state.require_jobs()  # 503 before reading the body when there is no Redis
    s = state.settings
    # A full backlog is 503 before the body is read (enqueue checks again, atomically): a raw
    # image's declared length is its bytes; a multipart body's is an upper bound only (1: any
    # image), and so is one past the byte limits (413 comes first, as the read answers it).
    declared = request.headers.get("content-length", "")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = (kind.startswith("image/") or kind == "application/octet-stream") and declared.isdigit()
    size = int(declared) if raw and int(declared) <= min(s.max_upload_bytes, s.max_request_bytes) else 1
    await queue.check_room(category, idempotency_key, client_scope(request, s), size)
    uploads = await read_uploads(request, s.max_files_per_request, s.max_upload_bytes, s.max_request_bytes)
    options = InspectOptions(heatmap=heatmap, overlay=overlay, heatmap_size=heatmap_size)
    await state.check_uploads(category, uploads, options)
    submitted = await queue.enqueue(category, uploads, options, request.scope["state"]["request_id"], idempotency_key,
                                    client=client_scope(request, s))
    record = submitted.record
    if submitted.queued:  # a resubmitted Idempotency-Key queued nothing: counted, it read as two jobs
        state.metrics.jobs.labels(category, "queued").inc()
    location = f"/v1/jobs/{record.id}"
    # A resubmitted Idempotency-Key gets its job as it stands (done, say), not "queued" again:
    # a client polling only while queued would otherwise wait on a job that already finished.
    workers = await _workers_alive(queue, record)
    body = JobAccepted(id=record.id, status=record.status, category=category, images=len(uploads), url=location,
                       workers=workers)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Location": location})


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=[Authed], responses={
    **ok(), **errors({401: UNAUTHORIZED, 404: "`job_not_found` (another API key's job too)",
                      500: "`job_record_unreadable`, `internal_error`",
                      503: "`redis_required` (no Redis configured), " + _REDIS_DOWN})})
async def get_job(job_id: str, request: Request, state: StateDep) -> JobStatus:
    queue = state.require_job_status()
    record = await queue.records.get(job_id)
    # Another client's job is answered as one that never existed: before, any valid key read
    # any job whose id it had seen (an access log, a shared ticket), results and links included.
    # A record without an owner (an open API's, or one written before owners) answers anyone.
    if isinstance(record, JobRecord) and record.client and record.client != client_scope(request, state.settings):
        record = None
    if record is None:
        raise ApiError(404, "job_not_found", "no such job: it never existed, expired (MSFLOW_JOB_TTL_S), or "
                       "finished long enough ago to be evicted (MSFLOW_JOB_MAX_RESULTS_BYTES)")
    if isinstance(record, Unreadable):  # written by another version of the service, or damaged
        raise ApiError(500, "job_record_unreadable", f"this job's stored record cannot be read: {record.reason}")
    workers = await _workers_alive(queue, record)
    return JobStatus(id=record.id, status=record.status, category=record.category, created_at=record.created_at,
                     updated_at=record.updated_at, attempts=record.attempts, worker=record.worker,
                     result=record.result, error=record.error, workers=workers)
