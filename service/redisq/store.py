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
fails, the cache is bypassed and links go to this process's memory (to files every front end of
a multi-process server reads: :class:`FolderLinks`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from redis.exceptions import ResponseError

from service.config import Settings, largest_heatmap_png_bytes
from service.metrics import ServiceMetrics
from service.redisq.budget import BudgetedStore
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.schemas import InspectOptions, HeatmapLink, ImageResult

log = logging.getLogger(__name__)

_LINK_ID = r"[A-Za-z0-9_-]{32}"  # secrets.token_urlsafe(24)
LINK_ID = re.compile(f"^{_LINK_ID}$")
LINK_URL = re.compile(rf"/v1/heatmaps/({_LINK_ID})\.png")
# A link file larger than this is written and read in a thread: the largest heatmap PNG
# (~16 MiB) took 44 ms to write, which would stall the event loop's other requests.
_OFFLOAD_BYTES = 1 << 20


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# The share of a request's time left that one of its optional Redis calls (cache lookup, cache
# write, a link's durable copy) may take: a healthy Redis answers in a millisecond, and a hung
# one took ~0.6 s (the call's bound), so a request whose deadline was near that answered 504.
# A call cut short leaves the breaker as it is: the request's budget ran out, not Redis's bound.
DEADLINE_SHARE = 0.25


def deadline_share(deadline: float) -> float:
    """What one optional Redis call of a request may take: :data:`DEADLINE_SHARE` of the time
    left before ``deadline`` (``time.monotonic()``)."""
    return max(0.0, deadline - time.monotonic()) * DEADLINE_SHARE


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


class FolderLinks:
    """The links of one front end of a multi-process server (``MSFLOW_API_PROCESSES`` > 1), which
    every front end serves: the kernel hands a link's GET to any of them.

    Each front end writes its PNGs as files in a folder of its own, ``<run dir>/links/<NN>``
    (:mod:`service.supervisor`; NN, its index, also starts each of its ids), and is that
    folder's only writer: it bounds it as :class:`MemoryLinks` bounds memory (count, bytes,
    TTL, kept here, oldest evicted first) and deletes what it evicts. Any front end reads a
    link by its id alone (``<run dir>/links/<id[:2]>/<id>``), stale once its file is ``ttl_s``
    old: no message between processes, one file write per link. A PNG that cannot be written
    (file system full) stays in this process, served by this front end only, as before. The
    supervisor removes the folder when the process ends (uvicorn ends a front end by its
    SIGTERM again, so no exit handler would run).
    """

    def __init__(self, folder: Path, max_items: int, max_bytes: int, ttl_s: float) -> None:
        if not re.fullmatch(r"[0-9]{2}", folder.name):
            raise ValueError(f"a link folder is named by its front end's index, two digits: {folder}")
        self.folder, self.root = folder, folder.parent
        self.max_items, self.max_bytes, self.ttl_s = max_items, max_bytes, ttl_s
        # id -> (expiry on the monotonic clock, bytes, the PNG where no file holds it)
        self._items: collections.OrderedDict[str, tuple[float, int, bytes | None]] = collections.OrderedDict()
        self._bytes = 0
        self._failing = False
        shutil.rmtree(folder, ignore_errors=True)  # a predecessor's, should the supervisor have missed it
        folder.mkdir(mode=0o700, parents=True)

    def new_id(self) -> str:
        """Unguessable as a plain id (180 random bits), and it names the folder that holds it."""
        return self.folder.name + secrets.token_urlsafe(24)[2:]

    async def put(self, key: str, png: bytes) -> None:
        kept: bytes | None = None
        try:
            if len(png) > _OFFLOAD_BYTES:
                await asyncio.to_thread(_write_new, self.folder / key, png)
            else:
                _write_new(self.folder / key, png)
            if self._failing:
                log.info("heatmap links: files in %s again; every front end serves them", self.folder)
            self._failing = False
        except OSError as exc:
            kept = png
            if not self._failing:
                log.warning("heatmap links: cannot write %s (%s): links stay in this front end, and the others "
                            "answer their GETs 404 until a write succeeds", self.folder, exc)
            self._failing = True
        self._items[key] = (time.monotonic() + self.ttl_s, len(png), kept)
        self._bytes += len(png)
        now = time.monotonic()
        while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes
                               or next(iter(self._items.values()))[0] <= now):
            self._drop(next(iter(self._items)))

    async def get(self, key: str) -> bytes | None:
        """The PNG of a valid link id made by any front end, or None."""
        item = self._items.get(key)
        if item is not None:
            if item[0] <= time.monotonic():
                self._drop(key)
                return None
            if item[2] is not None:
                return item[2]
        try:
            file = open(self.root / key[:2] / key, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return None
        with file:
            stat = os.fstat(file.fileno())
            if stat.st_mtime + self.ttl_s <= time.time():  # its owner deletes it at its next put
                return None
            if stat.st_size > _OFFLOAD_BYTES:
                return await asyncio.to_thread(file.read)
            return file.read()

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[1]
            if item[2] is None:
                (self.folder / key).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._items)


def _write_new(path: Path, data: bytes) -> None:
    """``data`` as a new file; nothing left on failure (a full disk: a torn PNG)."""
    try:
        with open(path, "xb") as file:
            file.write(data)
    except OSError:
        path.unlink(missing_ok=True)
        raise


class HeatmapLinks:
    """``heatmap=url`` PNGs behind unguessable ids, served by ``GET /v1/heatmaps/<id>.png``.

    The API writes each PNG to Redis (any replica serves it) *and* to a bounded in-process
    LRU (this replica serves it without a round trip, and during a Redis outage). Without
    Redis, or while it is down, a link lives only in this process: still served here, but
    not by other replicas, and lost on restart. A front end of a multi-process server
    (``heatmap_links_dir`` set) keeps it in :class:`FolderLinks` instead, so that each front
    end of the server serves it. The worker passes ``memory=False``: its links must be in
    Redis, or the job attempt fails and is retried; and ``ttl_s=job_ttl_s``: a job's result is
    read for as long as its record lives, often hours later, and a link that expired with a
    synchronous answer's ``heatmap_ttl_s`` (10 minutes) left a day-old result with dead links.
    The byte budget still bounds them all (a new link evicts those expiring soonest).
    """

    def __init__(self, settings: Settings, conn: RedisConnection | None, memory: bool = True,
                 metrics: ServiceMetrics | None = None, ttl_s: float | None = None) -> None:
        self.conn = conn
        self.ttl_s = settings.heatmap_ttl_s if ttl_s is None else ttl_s  # the worker's: a job record's life
        self.metrics = metrics
        self.shared: FolderLinks | None = None
        self.memory: MemoryLinks | None = None
        if memory and settings.heatmap_links_dir is not None:
            self.shared = FolderLinks(settings.heatmap_links_dir, settings.heatmap_memory_items,
                                      settings.heatmap_memory_bytes, settings.heatmap_ttl_s)
        elif memory:
            self.memory = MemoryLinks(settings.heatmap_memory_items, settings.heatmap_memory_bytes)
        self.budgeted = BudgetedStore(conn, "links", settings.heatmap_max_bytes) if conn is not None else None
        # What a link read from Redis may hold: no heatmap this server renders is larger.
        self.max_png_bytes = largest_heatmap_png_bytes(settings.max_heatmap_pixels)

    def _key(self, link_id: str) -> str:
        return self.conn.key("heatmap", link_id) if self.conn else link_id

    async def put(self, png: bytes, width: int, height: int,
                  deadline: float | None = None) -> tuple[HeatmapLink, bool]:
        """``deadline``: the Redis write may take :data:`DEADLINE_SHARE` of the time left before
        it; a slower one leaves the link in this process (or fails where there is none)."""
        link_id = self.shared.new_id() if self.shared is not None else secrets.token_urlsafe(24)
        ttl_ms = int(self.ttl_s * 1000)
        durable = False
        if self.budgeted is not None:
            key = self._key(link_id)
            try:
                if not self.budgeted.fits(key, png):  # settings refuse such a budget: a safeguard
                    raise RedisUnavailable(f"a heatmap of {len(png)} bytes exceeds MSFLOW_HEATMAP_MAX_BYTES")
                within = None if deadline is None else deadline_share(deadline)
                try:
                    async with asyncio.timeout(within):
                        evicted = await self.budgeted.put("heatmap_put", [(key, png, ttl_ms)])
                except TimeoutError:
                    raise RedisUnavailable("the heatmap's Redis write outlasted its share of the deadline") from None
                durable = True
                if evicted and self.metrics is not None:
                    self.metrics.redis_evictions.labels("links").inc(evicted)
            except RedisUnavailable:
                if self.memory is None and self.shared is None:
                    raise
        if self.shared is not None:
            await self.shared.put(link_id, png)
        elif self.memory is not None:
            self.memory.put(link_id, png, self.ttl_s)
        if self.metrics is not None:
            self.metrics.heatmap_links.labels("redis" if durable else "memory").inc()
        link = HeatmapLink(url=f"/v1/heatmaps/{link_id}.png", expires_at=utcnow() + timedelta(milliseconds=ttl_ms),
                           width=width, height=height)
        return link, durable

    async def get(self, link_id: str) -> bytes | None:
        """The PNG, or None (unknown, expired, malformed id). Raises :class:`RedisUnavailable`
        when only Redis could know and it is unreachable."""
        if not LINK_ID.fullmatch(link_id):
            return None
        if self.memory is not None and (png := self.memory.get(link_id)) is not None:
            return png
        if self.shared is not None and (png := await self.shared.get(link_id)) is not None:
            return png
        if self.conn is None:
            return None
        # At most one byte past the largest heatmap PNG: a key holding more (written by no
        # server, or one of larger MSFLOW_MAX_HEATMAP_PIXELS) was read whole, 200 MB into this
        # process's memory per GET, and its read timed out and opened the breaker.
        key, limit = self._key(link_id), self.max_png_bytes
        try:
            png = await self.conn.run("heatmap_get", lambda r: r.getrange(key, 0, limit), payload_bytes=limit)
        except RedisUnavailable as exc:
            if not isinstance(exc.__cause__, ResponseError):
                raise
            log.warning("heatmap link %s: Redis refused to read it (%s): not served", link_id, exc.__cause__)
            return None  # Redis answered (WRONGTYPE: no link of ours): retrying would not help
        if len(png) > limit:
            log.warning("heatmap link %s holds more than the largest heatmap PNG (%d bytes): not served", link_id,
                        limit)
            return None
        return png or None  # GETRANGE of a missing key is empty


# ---------------------------------------------------------------------- result cache
def _parse(value: bytes | None, limit: int) -> "CachedResult | None":
    if value is None or len(value) > limit:  # more than an entry this server writes: not ours
        return None
    try:
        return CachedResult.model_validate_json(value)
    except ValidationError:  # written by an older schema, or not by us: a miss
        return None


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

    async def get_many(self, keys: Sequence[str], within_s: float | None = None) -> list[CachedResult | None]:
        """``within_s``: how long the caller can spare (a lookup slower than that is a miss, and
        the breaker is left as it is: the caller's budget ran out, not Redis's bound)."""
        assert self.conn is not None
        conn, limit = self.conn, self.max_entry_bytes
        try:
            async with asyncio.timeout(within_s):
                found = [_parse(value, limit) for value in await conn.get_bounded("cache_get", keys, limit)]
                await self._drop_dead_links(conn, found)
        except (RedisUnavailable, TimeoutError):
            self.metrics.cache_requests.labels("error").inc(len(keys))
            return [None] * len(keys)
        for entry in found:
            self.metrics.cache_requests.labels("hit" if entry else "miss").inc()
        return found

    @staticmethod
    async def _drop_dead_links(conn: RedisConnection, found: list[CachedResult | None]) -> None:
        """Hits whose heatmap link is gone become misses: links have a budget of their own, and
        one written faster than it holds is evicted before its TTL while the cached results
        naming it live on (they were answered with a link already 404). One round trip, only
        for hits carrying links."""
        linked = [(i, LINK_URL.fullmatch(e.result.heatmap.url)) for i, e in enumerate(found)
                  if e is not None and isinstance(e.result.heatmap, HeatmapLink)]
        if not linked:
            return
        keys = [conn.key("heatmap", m.group(1)) for _, m in linked if m]

        async def exist(r: Any) -> list[int]:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return await pipe.execute()
        alive = iter(await conn.run("cache_links", exist) if keys else [])
        for i, match in linked:
            if not (match and next(alive)):
                found[i] = None

    async def put_many(self, entries: Sequence[tuple[str, CachedResult, float]], within_s: float | None = None) -> None:
        """``(key, entry, ttl_s)``; the TTL is capped at ``cache_ttl_s``; oversized entries are skipped.
        ``within_s``: how long the answer may wait for the write (none left: not written)."""
        assert self.budgeted is not None
        rows = []
        for key, entry, ttl_s in entries:
            data = entry.model_dump_json().encode()
            ttl_ms = int(min(ttl_s, self.ttl_s) * 1000)
            if len(data) <= self.max_entry_bytes and ttl_ms > 0 and self.budgeted.fits(key, data):
                rows.append((key, data, ttl_ms))
        if not rows or (within_s is not None and within_s <= 0):
            return
        try:  # one script for the whole request: the entries and the budget's index change together
            async with asyncio.timeout(within_s):
                evicted = await self.budgeted.put("cache_put", rows)
        except (RedisUnavailable, TimeoutError):
            return  # counted by the connection; the answer is already computed
        if evicted:
            self.metrics.redis_evictions.labels("cache").inc(evicted)
