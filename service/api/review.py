"""The review queue over HTTP (reviewer or admin key: :func:`service.api.auth.require_reviewer_key`):

* ``GET  /v1/review/{category}/items?verdict=&after=&limit=``: pending (unlabelled) items,
  oldest first, paged by the ``after`` cursor;
* ``GET  /v1/review/{category}/items/{id}``, ``.../image``, ``.../heatmap.png``;
* ``PUT  /v1/review/{category}/items/{id}/label`` ``{"label": "ok"|"ng", "defect_type", "note"}``:
  records who (the key's name) and when; a second PUT relabels (the answer names the label
  it replaced);
* ``GET  /v1/review/{category}/stats``: pending by verdict, labels by outcome, model-operator
  agreement and disagreement by model version;
* ``GET  /v1/review/{category}/export``: the labels as a data set (zip: ``labels.jsonl``,
  ``good/``, ``ng/<defect type>/``), streamed.

The store (:mod:`models.review_store`) is files on a shared volume; every call here runs in a
thread. A store that cannot be read answers 503 with a fixed message (the path stays in the log).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, StreamingResponse

from models.manifest import CATEGORY_PATTERN, Verdict
from models.review_records import ReviewItem
from models.review_export import export_zip
from models.review_store import IMAGE_TYPES, ItemNotFound, ReviewStore
from service.api.auth import KeyFirstRoute, Reviewer, require_reviewer_key
from service.api.deps import StateDep, unknown_category
from service.api.errors import ApiError
from service.api.openapi import BODY_TOO_LARGE, UNAUTHORIZED, errors, ok
from service.api.thread_stream import ThreadStreams
from service.schemas import DisagreementCounts, ReviewEntry, ReviewLabelled, ReviewLabelRequest, ReviewPage, ReviewStats

log = logging.getLogger(__name__)
# The key first, for every route here: a parameter's dependencies run in their order, and the
# category's came before the key's, so a client without one told a category the review store
# holds (401) from one it does not (404), and had the store's folder listed for it. And before
# the label's body is read (KeyFirstRoute): malformed JSON without a key was 422, not 401.
router = APIRouter(dependencies=[Depends(require_reviewer_key)], route_class=KeyFirstRoute)
_T = TypeVar("_T")
# Exports at once per process: each holds a thread of its own (not the default pool's, which
# the review store's calls need) and up to 2 MB of chunks on their way out.
_EXPORTS = ThreadStreams(2, "review-export")


async def _category(category: str, state: StateDep) -> str:
    """A served category, or one the review store still holds items of."""
    if CATEGORY_PATTERN.fullmatch(category) and (category in state.registry.categories
                                             or category in state.review.store.categories()):
        return category
    raise unknown_category(category, state.registry.categories)


Category = Annotated[str, Depends(_category)]

_FORBIDDEN = ("`review_disabled`, `forbidden` (a valid key that is neither a reviewer's nor an admin's), "
              "`host_refused` (opened by MSFLOW_DEV_OPEN_ADMIN: a Host that is not loopback)")
_STORE_DOWN = "`review_store_unavailable`"


def _errors(**more: str) -> dict[int | str, dict[str, Any]]:
    """What every route here may answer, and ``more`` (``s404=...`` for status 404)."""
    codes = {401: UNAUTHORIZED, 403: _FORBIDDEN, 404: "`unknown_category`", 503: _STORE_DOWN}
    codes.update({int(name[1:]): text for name, text in more.items()})
    return errors(codes)


_ITEM_NOT_FOUND = "`unknown_category`, `review_item_not_found`"
_BINARY = {"schema": {"type": "string", "format": "binary"}}


async def _io(state: StateDep, fn: Callable[..., _T], *args: Any) -> _T:
    try:
        return await asyncio.to_thread(fn, *args)
    except ItemNotFound:
        raise
    except OSError as exc:
        log.error("review store %s: %s", state.review.store.root, exc)
        raise ApiError(503, "review_store_unavailable", "the review store cannot be read or written now; "
                       "details in the server log") from exc


def _entry(category: str, item: ReviewItem, store: ReviewStore) -> ReviewEntry:
    base = f"/v1/review/{category}/items/{item.id}"
    return ReviewEntry(item=item, label=store.get_label(category, item.id), image_url=f"{base}/image",
                       heatmap_url=f"{base}/heatmap.png" if item.heatmap else None)


@router.get("/v1/review/{category}/items", response_model=ReviewPage,
            responses={**ok(), **_errors(s422="`invalid_request` (`verdict`, `after`, `limit`)")})
async def list_pending(category: Category, state: StateDep, who: Reviewer,
                       verdict: Verdict | None = None, after: Annotated[str | None, Query(max_length=64)] = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> ReviewPage:
    store = state.review.store
    items, cursor = await _io(state, store.pending, category, verdict, after, limit)
    # Each entry reads its label file: in the thread too (up to 100 round trips on a network volume).
    entries = await _io(state, lambda: [_entry(category, i, store) for i in items])
    return ReviewPage(category=category, verdict=verdict, items=entries, next_cursor=cursor)


@router.get("/v1/review/{category}/items/{item_id}", response_model=ReviewEntry,
            responses={**ok(), **_errors(s404=_ITEM_NOT_FOUND)})
async def get_item(category: Category, item_id: str, state: StateDep, who: Reviewer) -> ReviewEntry:
    store = state.review.store
    item = await _io(state, store.item, category, item_id)
    return await _io(state, _entry, category, item, store)


@router.get("/v1/review/{category}/items/{item_id}/image", response_class=FileResponse,
            responses={**ok("The image as uploaded", content={"image/*": _BINARY}), **_errors(s404=_ITEM_NOT_FOUND)})
async def get_image(category: Category, item_id: str, state: StateDep, who: Reviewer) -> FileResponse:
    path, media_type = await _io(state, state.review.store.file, category, item_id, "image")
    # item.json is on the shared volume: a type the store never writes (text/html) would have made
    # the file a page of the console's origin, able to read the key the console keeps.
    served = media_type if media_type in _IMAGE_MEDIA_TYPES else "application/octet-stream"
    return FileResponse(path, media_type=served, headers=_FILE_HEADERS)


@router.get("/v1/review/{category}/items/{item_id}/heatmap.png", response_class=FileResponse,
            responses={**ok("The heatmap PNG", content={"image/png": _BINARY}), **_errors(s404=_ITEM_NOT_FOUND)})
async def get_heatmap(category: Category, item_id: str, state: StateDep, who: Reviewer) -> FileResponse:
    path, media_type = await _io(state, state.review.store.file, category, item_id, "heatmap")
    return FileResponse(path, media_type=media_type, headers=_FILE_HEADERS)


_FILE_HEADERS = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
_IMAGE_MEDIA_TYPES = frozenset(media_type for _, media_type in IMAGE_TYPES.values())


@router.put("/v1/review/{category}/items/{item_id}/label", response_model=ReviewLabelled, responses={
    **ok(), **_errors(s403="`cross_site_refused`, " + _FORBIDDEN, s404=_ITEM_NOT_FOUND, s413=BODY_TOO_LARGE,
                      s422="`invalid_request` (the body: e.g. `defect_type` with a label other than ng), "
                           "`invalid_label`")})
async def label_item(category: Category, item_id: str, body: ReviewLabelRequest, state: StateDep,
                     who: Reviewer) -> ReviewLabelled:
    """Label an item OK or NG (``defect_type`` with NG only); the label records ``who`` and when."""
    label, previous = await _io(state, state.review.store.label, category, item_id, body.label, who,
                                body.defect_type, body.note)
    await state.review.refresh(category)  # the label and disagreement gauges, from the store
    return ReviewLabelled(label=label, previous=previous, stats=await _stats(state, category))


@router.get("/v1/review/{category}/stats", response_model=ReviewStats, responses={**ok(), **_errors()})
async def stats(category: Category, state: StateDep, who: Reviewer) -> ReviewStats:
    return await _stats(state, category)


async def _stats(state: StateDep, category: str) -> ReviewStats:
    store = state.review.store

    def compute() -> ReviewStats:
        scan = store.scan(category)
        pending = {v: 0 for v in ("review", "ok", "ng")}
        for e in scan.pending:
            pending[e.verdict] = pending.get(e.verdict, 0) + 1
        labels = store.labels(category)
        by_version: dict[str, DisagreementCounts] = {}
        for lab in labels:
            counts = by_version.setdefault(lab.model_version, DisagreementCounts(false_positive=0, false_negative=0))
            if not lab.agrees:
                field = "false_positive" if lab.model_is_anomalous else "false_negative"
                setattr(counts, field, getattr(counts, field) + 1)
        items, size = store.usage()
        return ReviewStats(category=category, pending=pending,
                           labelled={"ok": sum(lab.label == "ok" for lab in labels),
                                     "ng": sum(lab.label == "ng" for lab in labels)},
                           agree=sum(lab.agrees for lab in labels), disagreements=by_version,
                           items=len(scan.entries), store_items=items, store_bytes=size)

    return await _io(state, compute)


@router.get("/v1/review/{category}/export", response_class=StreamingResponse,
            responses={**ok("The labels as a zip, streamed", content={"application/zip": _BINARY}),
                       **_errors(s503=_STORE_DOWN + ", `export_busy` (Retry-After: 10)")})
async def export(category: Category, state: StateDep, who: Reviewer) -> StreamingResponse:
    """Every labelled item of the category as a zip, streamed as it is written (no temporary file)."""
    body = _EXPORTS.open(lambda sink: export_zip(state.review.store, category, sink),
                         f"review export of {category}")
    if body is None:
        raise ApiError(503, "export_busy", f"{_EXPORTS.limit} exports are running on this server process; retry "
                       "when one has finished", headers={"Retry-After": "10"})
    return StreamingResponse(body, media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{category}-labels.zip"', "Cache-Control": "no-store"})
