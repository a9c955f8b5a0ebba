"""The review queue's capture: uncertain answers (verdict ``review``) and a random audit sample
of ``ok`` and ``ng`` ones are kept with their result in the review store
(:mod:`models.review_store`), for an operator to label (:mod:`service.api.review`).

Kept off the hot path. :meth:`ReviewCapture.offer` runs once per answered request or job
batch (the runtime calls it after post-processing, so the API and the worker capture alike)
and only appends references to the image records to a queue bounded in items and bytes
(``MSFLOW_REVIEW_QUEUE_ITEMS``, ``MSFLOW_REVIEW_QUEUE_BYTES``): the upload, the decoded pixels
and the map stay alive until written, so that memory is budgeted before it is held. One
dedicated writer thread (not the decode pool: a slow disk must never delay a decode) renders
the heatmap and writes each item under the store's own budget. A full queue, a full store
or a failed write drops the item and counts it in ``msflow_review_captures_total{outcome}``;
none of them ever fails an inspection. Cached answers are not offered: their image was kept
(or not) when it was first scored, and the store refuses duplicates anyway.

A maintenance loop applies the retention and reads the pending counts
(``msflow_review_pending``) every ``MSFLOW_REVIEW_SCAN_S``; after captures they are read
again within a second. The store keeps what it read between calls
(:mod:`models.review_index`), so neither a capture nor a refresh rereads a full store: the
store's own budget (10,000 items by default) no longer prices every captured image.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from models.manifest import Calibration
from models.review_store import Budget, ReviewStore, image_digest
from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.item import InspectedImage
from service.pipeline.render import heatmap_for
from service.redisq.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# The gauges are the store's state, read from it; at an audit rate of 2% a busy server
# captures several images a second, and reading the tallies after each one cost more than
# the captures (docs/performance-log.md). A second's lag on a gauge costs nothing.
REFRESH_AFTER_WRITES_S = 1.0
_ITEM_FIELDS = ("model_version", "verdict", "is_anomalous", "raw_score", "score", "threshold", "ng_threshold")


def review_root(settings: Settings) -> Path:
    """``MSFLOW_REVIEW_STORE``, else ``<model store>/.review`` (a dot folder: never a category)."""
    return Path(settings.review_store) if settings.review_store else Path(settings.model_store) / ".review"


def open_store(settings: Settings) -> ReviewStore:
    return ReviewStore(review_root(settings), Budget(
        max_bytes=settings.review_max_bytes, max_items=settings.review_max_items,
        category_share=settings.review_category_share,
        retention_s=settings.review_retention_s, label_retention_s=settings.review_label_retention_s))


@dataclass(frozen=True)
class _Kept:
    category: str
    engine: str
    colours: Calibration  # the manifest's: heatmap colours are the model's (as in answers)
    reason: str
    item: InspectedImage
    cost: int  # bytes held in memory while queued


def _for_writer(item: InspectedImage) -> InspectedImage:
    """What the writer needs of an answered image, apart from what only its answer needed.

    The writer renders its own heatmap (model size, :meth:`ReviewCapture._write`), yet the
    record also holds the answer's rendered PNG (an original-size overlay: up to ~16 MB) and,
    for ``heatmap=inline``, its base64 copy in ``result``; queued as it is, 16 items counted
    29 KB against a 2 MiB budget while pinning ~149 MiB. A shallow copy without them: the
    caller's record (still being answered from) keeps its own.

    The map is copied: the caller's may be a view of memory lent for the answer only (a
    multi-process front end's slot, given back once the answer is made; in one process, a view
    of its batch's maps, all of which it would keep alive). Captures are a sample, so the answers
    that are not captured read their maps in place."""
    result = item.answer
    if result.heatmap is not None:
        result = result.model_copy(update={"heatmap": None})
    heat = item.anomaly_map
    return dataclasses.replace(item, heatmap_png=None, display=None, result=result,
                               anomaly_map=None if heat is None else heat.copy())


def _held_bytes(item: InspectedImage) -> int:
    """What a queued record (see :func:`_for_writer`) keeps alive: the upload and model-size arrays."""
    arrays = sum(a.nbytes for a in (item.tensor, item.anomaly_map) if a is not None)
    return len(item.data) + arrays


class ReviewCapture:
    """Bounded queue + one writer thread into the review store. ``offer`` is event-loop only."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics,
                 sample: Callable[[], float] = random.random) -> None:
        self.enabled = settings.review_enabled
        self.store = open_store(settings)
        self.metrics = metrics
        self.audit_rate = settings.review_audit_rate
        self.max_items, self.max_bytes = settings.review_queue_items, settings.review_queue_bytes
        self.scan_s = settings.review_scan_s
        self._sample = sample
        self._queue: collections.deque[_Kept] = collections.deque()
        self._in_hand: _Kept | None = None  # taken off the queue, being written
        self._bytes = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._failing: set[str] = set()  # categories whose last write failed (logged once)
        self._refreshed_at = -REFRESH_AFTER_WRITES_S  # time.monotonic() of the gauges' last refresh

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the writer and the maintenance loop (call from the running event loop)."""
        if not self.enabled or self._tasks:
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="review")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_loop(), name="review-writer"),
                       loop.create_task(self._maintain(), name="review-maintenance")]

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to ``timeout_s``), then drop the rest (counted)."""
        if not self._tasks:
            return
        end = time.monotonic() + timeout_s
        # The one in hand too: cancelled while it waits for the review thread, its write was
        # dropped unsaid (1 of 16 captures in 4 stops right after the queue emptied).
        while (self._queue or self._in_hand is not None) and time.monotonic() < end:
            self._wake.set()
            await asyncio.sleep(0.02)
        await cancel_and_wait(self._tasks)  # bounded, whatever a task does with its cancellation
        self._tasks = []
        if self._in_hand is not None:  # past the timeout: counted with the rest
            self._queue.appendleft(self._in_hand)
            self._in_hand = None
        while self._queue:
            kept = self._queue.popleft()
            self._count(kept, "shutdown")
        self._bytes = 0
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the review thread, in order with the captures (retention)."""
        if self._pool is None:
            return await asyncio.to_thread(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ the hot path's only call
    def offer(self, category: str, engine: str, colours: Calibration, items: Sequence[InspectedImage]) -> None:
        """Queue the answered images worth a person's look; O(1) per image, never raises."""
        if not self._tasks:
            return
        for item in items:
            result = item.result
            if result is None or item.cached:
                continue
            if result.verdict == "review":
                reason = "review"
            elif self.audit_rate and self._sample() < self.audit_rate:
                reason = "audit"
            else:
                continue
            queued = _for_writer(item)
            kept = _Kept(category, engine, colours, reason, queued, _held_bytes(queued))
            if len(self._queue) >= self.max_items or self._bytes + kept.cost > self.max_bytes:
                self._count(kept, "queue_full")
                continue
            self._queue.append(kept)
            self._bytes += kept.cost
        if self._queue:
            self._wake.set()

    # ------------------------------------------------------------------ background
    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        refresh_due: float | None = None  # the gauges, after writes: at most once per REFRESH_AFTER_WRITES_S
        while True:
            try:
                async with asyncio.timeout(None if refresh_due is None else max(0.0, refresh_due - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._queue and refresh_due is None:
                refresh_due = self._refreshed_at + REFRESH_AFTER_WRITES_S
            while self._queue:
                kept = self._in_hand = self._queue.popleft()
                try:
                    outcome = await loop.run_in_executor(self._pool, self._write, kept)
                except Exception as exc:  # a full disk, a read-only volume: counted, never raised
                    outcome = "error"
                    if kept.category not in self._failing:
                        log.warning("review store %s: cannot keep a %s image (%s: %s); counted in "
                                    "msflow_review_captures_total{outcome=\"error\"}", self.store.root,
                                    kept.category, type(exc).__name__, exc)
                    self._failing.add(kept.category)
                else:
                    self._failing.discard(kept.category)
                finally:
                    self._bytes -= kept.cost
                self._in_hand = None
                self._count(kept, outcome)
            if refresh_due is not None and time.monotonic() >= refresh_due:
                refresh_due = None
                await self.refresh()

    def _write(self, kept: _Kept) -> str:
        """Blocking, on the review thread: render the heatmap, write the item under the budget."""
        item, result = kept.item, kept.item.answer
        digest = image_digest(item.data)
        refused = self.store.refusal(kept.category, item.data, digest)
        if refused is not None:  # a full store stays full for a while: no heatmap rendered for nothing
            return refused
        side = int(item.score_map.shape[0])
        size = (side, side)
        png = heatmap_for(item.score_map, kept.colours, item.model_input, None, size, False)
        fields = {name: getattr(result, name) for name in _ITEM_FIELDS}
        fields.update(reason=kept.reason, engine=kept.engine, filename=item.filename,
                      regions=[r.model_dump() for r in result.regions])
        outcome, _ = self.store.add(kept.category, fields, item.data, item.format or "", item.size, png, size,
                                    digest=digest)
        return outcome

    async def _maintain(self) -> None:
        while True:
            try:
                removed = await self.run(self.store.prune)
                if removed:
                    log.info("review store %s: %d expired item(s) removed", self.store.root, removed)
                await self.refresh()
            except Exception:  # never let the loop die (an unreadable store is counted by writes)
                log.exception("review store maintenance failed")
            await asyncio.sleep(self.scan_s)

    async def refresh(self, category: str | None = None) -> None:
        """Set the review gauges from the store: pending items, labels by outcome, and
        model-operator disagreements by version. Gauges of the store's state rather than
        counters of label events: a relabel replaces a label, and every replica then
        reports the same (shared) truth, which survives restarts."""
        self._refreshed_at = time.monotonic()
        try:
            tallies = await asyncio.to_thread(self._tallies, category)
        except OSError:
            return
        for name, pending, labelled, disagreements in tallies:
            self.metrics.set_review_tallies(name, pending, labelled, disagreements)
        if category is None:  # every category the store holds: the others' folders were removed
            for gone in self.metrics.review_categories() - {name for name, *_ in tallies}:
                self.metrics.forget_review_category(gone)

    def _tallies(self, only: str | None) -> list[tuple[str, int, dict[str, int], dict[tuple[str, str], int]]]:
        out = []
        for category in [only] if only is not None else self.store.categories():
            labels = self.store.labels(category)
            labelled = collections.Counter(lab.label for lab in labels)
            disagreements: collections.Counter[tuple[str, str]] = collections.Counter()
            for version in {lab.model_version for lab in labels}:  # zeros too: a corrected label lowers it
                disagreements[(version, "false_positive")] += 0
                disagreements[(version, "false_negative")] += 0
            for lab in labels:
                if not lab.agrees:
                    kind = "false_positive" if lab.model_is_anomalous else "false_negative"
                    disagreements[(lab.model_version, kind)] += 1
            out.append((category, len(self.store.scan(category).pending), dict(labelled), dict(disagreements)))
        return out

    def _count(self, kept: _Kept, outcome: str) -> None:
        self.metrics.review_captures.labels(kept.category, kept.reason, outcome).inc()
