"""``POST /v1/inspect/{category}`` (JSON, or the PNG itself for ``Accept: image/png``) and
``GET /v1/heatmaps/<id>.png`` (the links of ``heatmap=url``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.api.auth import Authed, KeyFirstRoute, refuse_cross_site, require_api_key
from service.api.deps import StateDep, category_to_inspect, get_state
from service.api.errors import ApiError
from service.api.held_answer import held_answer, release
from service.api.openapi import PNG_ANSWER, UNAUTHORIZED, UPLOAD, errors, ok
from service.api.uploads import read_uploads
from service.config import Settings
from service.pipeline.admission import Ticket
from service.pipeline.decode import TooManyFiles
from service.pipeline.item import InspectedImage
from service.pipeline.state import ServiceState
from service.schemas import Heatmap, HeatmapMode, HeatmapSize, InspectOptions, InspectResponse, Upload

router = APIRouter(route_class=KeyFirstRoute)

# Answers carrying more inline heatmap bytes than this are JSON-encoded in the thread pool:
# a 32-image answer with original-size heatmaps is tens of MB of base64, and encoding it on
# the event loop would stall every other request meanwhile.
_ENCODE_OFF_LOOP_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class InspectTarget:
    state: ServiceState
    category: str


async def inspect_target(request: Request, category: str) -> InspectTarget:
    """What the other routes resolve as three dependencies (the API key, a known category,
    the state), in one. FastAPI resolves every dependency of every request anew (cache key,
    parameter lists), about 30 µs apiece on the event loop of a 2.1 GHz Xeon: on the route
    that carries nearly all requests, one dependency instead of six (docs/performance-log.md)."""
    state = await get_state(request)
    # The key first: where keys are configured a request without one is 401, whichever site
    # sent it. Not read-only: an answer feeds the review store, recent scores and the drift
    # metrics; on a server without keys another site's page could fill the reviewers' queue.
    await require_api_key(request, state)
    await refuse_cross_site(request)
    return InspectTarget(state, await category_to_inspect(category, state))


_INSPECT_ERRORS = errors({
    400: "`bad_upload` (malformed multipart, or no part named `file`/`files`)",
    401: UNAUTHORIZED,
    403: "`cross_site_refused`",
    404: "`unknown_category`",
    406: "`not_acceptable`: the Accept header takes neither application/json nor image/png, or takes only "
         "image/png for an answer that cannot be one (more than one image, or `heatmap` other than inline)",
    408: "`request_timeout`: the body was still arriving at the deadline (MSFLOW_REQUEST_DEADLINE_MS from the "
         "request's arrival)",
    413: "`image_too_large`, `request_too_large`, `too_many_files` (over MSFLOW_MAX_FILES_PER_REQUEST, or over "
         "MSFLOW_MAX_QUEUE_SIZE, the images one category's queue holds), `too_many_pixels`",
    415: "`unsupported_media_type`",
    422: "`invalid_request` (query parameters), `undecodable_image` and the other refusals of an image's bytes",
    500: "`engine_error`, `non_finite_output`, `internal_error`",
    503: "`queue_full`, `server_busy`, `model_not_loaded`, `engine_unavailable`, `shutting_down`, "
         "`model_building` (the category is being built: its first model is not exported yet) (all with "
         "Retry-After)",
    504: "`deadline_exceeded`: no answer within MSFLOW_REQUEST_DEADLINE_MS of the request's arrival",
})


@router.post("/v1/inspect/{category}", response_model=InspectResponse, openapi_extra=UPLOAD, responses={
    **ok("The results as JSON; or, for `Accept: image/png` (preferred over JSON) with one image and "
         "`heatmap=inline`, the heatmap PNG itself with the result in headers",
         content={"image/png": {"schema": {"type": "string", "format": "binary"}}}, headers={
             name: {**spec, "required": False, "description": spec["description"] + " (image/png answers)"}
             for name, spec in PNG_ANSWER.items()}),
    **_INSPECT_ERRORS})
async def inspect(request: Request, target: Annotated[InspectTarget, Depends(inspect_target)],
                  heatmap: HeatmapMode = HeatmapMode.inline, overlay: bool = False,
                  heatmap_size: HeatmapSize = HeatmapSize.model) -> Response:
    """Score one or more images (multipart parts, or one raw image body).

    The answer is JSON (``heatmap`` says how each result carries its heatmap), or the heatmap
    PNG itself when ``Accept`` prefers ``image/png``: that answer needs one image and
    ``heatmap=inline`` (the default; the PNG *is* the inline heatmap). A request that prefers
    PNG but cannot have it gets JSON if its ``Accept`` takes JSON, else 406; so does an
    ``Accept`` that takes neither."""
    state, category = target.state, target.category
    started: float = request.scope["state"]["started"]
    deadline = started + state.settings.request_deadline_ms / 1e3
    wants_png, json_ok = _wants_png(request.headers.get("accept"))
    if not (wants_png or json_ok):
        raise ApiError(406, "not_acceptable", "this route answers application/json, or image/png (one image, "
                       "heatmap=inline); the Accept header takes neither")
    if wants_png and heatmap is not HeatmapMode.inline:
        if not json_ok:
            raise ApiError(406, "not_acceptable", "an image/png answer is the heatmap itself, inline: it cannot "
                           f"honour heatmap={heatmap.value} (ask for application/json, or leave heatmap out)")
        wants_png = False
    # The pixels admitted for the request stay so until its client has taken the answer
    # (service/api/held_answer.py): a slow reader held a large answer unpriced.
    holds: list[Ticket] = []
    try:
        # The model version is resolved once, here (503 now if it is still loading, before
        # reading the body); the whole request uses it, even if a reload swaps the category.
        with state.pin(category) as lane:
            s = state.settings
            uploads = await _before(deadline, _read_within_queue(request, s, lane.batcher.max_queue_size))
            if wants_png and len(uploads) != 1:
                if not json_ok:
                    raise ApiError(406, "not_acceptable", "an image/png answer needs exactly one image; "
                                   f"this request has {len(uploads)}")
                wants_png = False
            options = InspectOptions(heatmap=heatmap, overlay=overlay, heatmap_size=heatmap_size)
            items = await state.inspect(lane, uploads, options, deadline, started, wants_png,
                                        gone=lambda: _disconnected(request), hold=holds)
        if wants_png:
            png, headers = _png_answer(items[0])
            return held_answer(png, "image/png", holds, state.pixels, headers)
        results = [item.answer for item in items]
        body = InspectResponse(request_id=request.scope["state"]["request_id"], category=category,
                               model_version=results[0].model_version, engine=items[0].engine or "",
                               results=results)
        inline = sum(len(r.heatmap.data) for r in results if isinstance(r.heatmap, Heatmap))
        # pydantic's own (Rust) encoder, straight to bytes: no dict of the answer in between.
        content = await state.run_blocking(body.model_dump_json) if inline > _ENCODE_OFF_LOOP_BYTES \
            else body.model_dump_json()
    except BaseException:
        release(holds)
        raise
    return held_answer(content, "application/json", holds, state.pixels)


async def _read_within_queue(request: Request, s: Settings, queue_size: int) -> list[Upload]:
    """The request's images, at most as many as one request may carry and the category's queue
    can hold: a request's images are queued together (all or none), so more than the queue
    holds could never be served; 413 says so, where 503 ``queue_full`` + Retry-After would have
    the client retry in vain."""
    limit = min(s.max_files_per_request, queue_size)
    try:
        return await read_uploads(request, limit, s.max_upload_bytes, s.max_request_bytes)
    except TooManyFiles as exc:
        if limit == s.max_files_per_request:
            raise
        raise TooManyFiles(f"more than {limit} images in one request: a category's queue holds {queue_size} "
                           f"(MSFLOW_MAX_QUEUE_SIZE) and a request's images are queued together, so a request may "
                           f"carry at most {limit} here", details={"limit": limit, "max_queue_size": queue_size,
                                                                   "max_files_per_request": s.max_files_per_request}
                           ) from exc


async def _before(deadline: float, work: Awaitable[list[Upload]]) -> list[Upload]:
    """``work`` (reading the body), unless the request's deadline (counted from its arrival)
    passes first: a client trickling its upload holds a slot only that long. 408, as the
    connection layer answers a late body on every other route: the client's upload was late,
    not the server (a 504 here counted a slow client in the inspect 5xx alert)."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return await work
    except TimeoutError as exc:
        raise ApiError(408, "request_timeout", "the request's body was still arriving at its deadline "
                       "(MSFLOW_REQUEST_DEADLINE_MS from its arrival)") from exc


@router.get("/v1/heatmaps/{heatmap_id}.png", dependencies=[Authed], response_class=Response, responses={
    **ok("The PNG", content={"image/png": {"schema": {"type": "string", "format": "binary"}}}),
    **errors({401: UNAUTHORIZED, 404: "`heatmap_not_found` (expired, evicted or never existed)",
              503: "`redis_unavailable` (a link only Redis holds, while Redis is down)"})})
async def get_heatmap(heatmap_id: str, state: StateDep) -> Response:
    """The PNG of a ``heatmap=url`` result, until its link expires (``heatmap_ttl_s``)."""
    png = await state.links.get(heatmap_id)
    if png is None:
        raise ApiError(404, "heatmap_not_found", "no such heatmap: the link expired or never existed")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is already read, so the next ASGI
    message can only be ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def _png_answer(item: InspectedImage) -> tuple[bytes, dict[str, str]]:
    """The heatmap itself (``wants_png`` rendered it for this request: the cache was bypassed)
    and the headers that carry the result."""
    result = item.answer
    if item.heatmap_png is None:
        raise RuntimeError(f"image {item.index} has no rendered heatmap for its image/png answer")
    return item.heatmap_png, {
        "X-Anomaly-Score": f"{result.score:.6f}", "X-Raw-Score": f"{result.raw_score:.6f}",
        "X-Threshold": f"{result.threshold:.6f}", "X-Is-Anomalous": str(result.is_anomalous).lower(),
        "X-Verdict": result.verdict, "X-Ng-Threshold": f"{result.ng_threshold:.6f}",
        "X-Model-Version": result.model_version, "X-Engine": item.engine or "",
        "X-Image-Size": f"{result.image_size.width}x{result.image_size.height}",
        "X-Heatmap-Size": f"{item.heatmap_width}x{item.heatmap_height}"}
