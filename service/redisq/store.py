"""Redis-backed state of the synchronous API: heatmap links and the result cache. The
connection and its circuit breaker are in :mod:`service.redisq.connection`, job records in
:mod:`service.redisq.records`, streams and consumer groups in :mod:`service.redisq.jobs`.

Keys (all under ``MSFLOW_REDIS_PREFIX``, default ``msflow:``):

- ``heatmap:<id>``: a ``heatmap=url`` PNG, expiring after ``heatmap_ttl_s``;
- ``cache:<category>:<version>:<sha256>``: one image's result, expiring after ``cache_ttl_s``;
  the digest covers the image bytes, category, model version, both verdict bounds and the options
  that change the answer, so a new model version misses by construction;
- ``budget:links:*``, ``budget:cache:*``: what links and cached results hold against their
  byte budgets (:mod:`service.redisq.budget`; a TTL alone bounds an entry's life, not the
  store's bytes).

Redis must never take the synchronous API down (see :mod:`service.redisq.connection`): when it
fails, the cache is bypassed and links go to this process's memory.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, ConfigDict, ValidationError

from service.config import Settings
from service.metrics import ServiceMetrics
from service.redisq.budget import BudgetedStore
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.schemas import InspectOptions, HeatmapLink, ImageResult

log = logging.getLogger(__name__)

LINK_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")  # secrets.token_urlsafe(24)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------- heatmap links
class MemoryLinks:
    """In-process PNGs by id: LRU bounded by count and bytes, each with a TTL. Event-loop only."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._bytes = 0

    def put(self, key: str, png: bytes, ttl_s: float) -> None:
        self._drop(key)
        self._items[key] = (time.monotonic() + ttl_s, png)
        self._bytes += len(png)
        now = time.monotonic()
        while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes
                               or next(iter(self._items.values()))[0] <= now):
            self._drop(next(iter(self._items)))

    def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item[1])

    def __len__(self) -> int:
        return len(self._items)


class HeatmapLinks:
    """``heatmap=url`` PNGs behind unguessable ids, served by ``GET /v1/heatmaps/<id>.png``.

    The API writes each PNG to Redis (any replica serves it) *and* to a bounded in-process
    LRU (this replica serves it without a round trip, and during a Redis outage). Without
    Redis, or while it is down, a link lives only in this process: still served here, but
    not by other replicas, and lost on restart. The worker passes ``memory=False``: its
    links must be in Redis, or the job attempt fails and is retried.
    """

    def __init__(self, settings: Settings, conn: RedisConnection | None, memory: bool = True,
                 metrics: ServiceMetrics | None = None) -> None:
        self.conn = conn
        self.ttl_s = settings.heatmap_ttl_s
        self.metrics = metrics
        self.memory = MemoryLinks(settings.heatmap_memory_items, settings.heatmap_memory_bytes) if memory else None
        self.budgeted = BudgetedStore(conn, "links", settings.heatmap_max_bytes) if conn is not None else None

    def _key(self, link_id: str) -> str:
        return self.conn.key("heatmap", link_id) if self.conn else link_id

    async def put(self, png: bytes, width: int, height: int) -> tuple[HeatmapLink, bool]:
        link_id = secrets.token_urlsafe(24)
        ttl_ms = int(self.ttl_s * 1000)
        durable = False
        if self.budgeted is not None:
            key = self._key(link_id)
            try:
                if not self.budgeted.fits(key, png):  # settings refuse such a budget: a safeguard
                    raise RedisUnavailable(f"a heatmap of {len(png)} bytes exceeds MSFLOW_HEATMAP_MAX_BYTES")
                evicted = await self.budgeted.put("heatmap_put", [(key, png, ttl_ms)])
                durable = True
                if evicted and self.metrics is not None:
                    self.metrics.redis_evictions.labels("links").inc(evicted)
            except RedisUnavailable:
                if self.memory is None:
                    raise
        if self.memory is not None:
            self.memory.put(link_id, png, self.ttl_s)
        if self.metrics is not None:
            self.metrics.heatmap_links.labels("redis" if durable else "memory").inc()
        link = HeatmapLink(url=f"/v1/heatmaps/{link_id}.png", expires_at=utcnow() + timedelta(milliseconds=ttl_ms),
                           width=width, height=height)
        return link, durable

    async def get(self, link_id: str) -> bytes | None:
        """The PNG, or None (unknown, expired, malformed id). Raises :class:`RedisUnavailable`
        when only Redis could know and it is unreachable."""
        if not LINK_ID.match(link_id):
            return None
        if self.memory is not None and (png := self.memory.get(link_id)) is not None:
            return png
        if self.conn is None:
            return None
        return await self.conn.run("heatmap_get", lambda r: r.get(self._key(link_id)))


# ---------------------------------------------------------------------- result cache
class CachedResult(BaseModel):
    """One image's cached answer and the engine that produced it."""

    model_config = ConfigDict(protected_namespaces=())

    engine: str
    result: ImageResult


class ResultCache:
    """Per-image results keyed by image bytes + category + version + threshold + options.

    Every method swallows Redis failures (counted as ``result="error"``): a cache problem
    makes a request slower, never a failure.
    """

    def __init__(self, settings: Settings, conn: RedisConnection | None, metrics: ServiceMetrics) -> None:
        self.conn = conn
        self.enabled = bool(settings.cache_enabled and conn is not None)
        self.ttl_s = settings.cache_ttl_s
        self.max_entry_bytes = settings.cache_max_entry_bytes
        self.metrics = metrics
        self.budgeted = BudgetedStore(conn, "cache", settings.cache_max_bytes) if conn is not None else None

    def key(self, image_digest: str, category: str, version: str, threshold: float, options: InspectOptions,
            ng_threshold: float | None = None) -> str:
        """``ng_threshold``: the effective ng bound, which decides the verdict as much as ``threshold``."""
        assert self.conn is not None
        spec = "|".join((image_digest, category, version, repr(float(threshold)), options.heatmap.value,
                         str(options.overlay).lower(), options.heatmap_size.value,
                         "" if ng_threshold is None else repr(float(ng_threshold))))
        return self.conn.key("cache", category, version, hashlib.sha256(spec.encode()).hexdigest())

    async def get_many(self, keys: Sequence[str]) -> list[CachedResult | None]:
        assert self.conn is not None
        try:
            raw = await self.conn.run("cache_get", lambda r: r.mget(list(keys)))
        except RedisUnavailable:
            self.metrics.cache_requests.labels("error").inc(len(keys))
            return [None] * len(keys)
        found: list[CachedResult | None] = []
        for value in raw:
            entry = None
            if value is not None:
                try:
                    entry = CachedResult.model_validate_json(value)
                except ValidationError:  # written by an older schema: a miss
                    entry = None
            self.metrics.cache_requests.labels("hit" if entry else "miss").inc()
            found.append(entry)
        return found

    async def put_many(self, entries: Sequence[tuple[str, CachedResult, float]]) -> None:
        """``(key, entry, ttl_s)``; the TTL is capped at ``cache_ttl_s``; oversized entries are skipped."""
        assert self.budgeted is not None
        rows = []
        for key, entry, ttl_s in entries:
            data = entry.model_dump_json().encode()
            ttl_ms = int(min(ttl_s, self.ttl_s) * 1000)
            if len(data) <= self.max_entry_bytes and ttl_ms > 0 and self.budgeted.fits(key, data):
                rows.append((key, data, ttl_ms))
        if not rows:
            return
        try:  # one script for the whole request: the entries and the budget's index change together
            evicted = await self.budgeted.put("cache_put", rows)
        except RedisUnavailable:
            return  # counted by the connection; the answer is already computed
        if evicted:
            self.metrics.redis_evictions.labels("cache").inc(evicted)
