"""Redis-backed state: heatmap links, the result cache and job records. The connection and
its circuit breaker are in :mod:`service.redisq.connection`, streams and consumer groups in
:mod:`service.redisq.jobs`.

Keys (all under ``MSFLOW_REDIS_PREFIX``, default ``msflow:``):

- ``heatmap:<id>``: a ``heatmap=url`` PNG, expiring after ``heatmap_ttl_s``;
- ``cache:<category>:<version>:<sha256>``: one image's result, expiring after ``cache_ttl_s``;
  the digest covers the image bytes, category, model version, both verdict bounds and the options
  that change the answer, so a new model version misses by construction;
- ``job:<id>`` (the :class:`JobRecord`, JSON) and ``job:<id>:images`` (the uploads);
- ``budget:links:*``, ``budget:cache:*``, ``budget:job-results:<category>:*``: what links,
  cached results and finished job records hold against their byte budgets
  (:mod:`service.redisq.budget`; a TTL alone bounds an entry's life, not the store's bytes).

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
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError

from service.config import Settings
from service.metrics import ServiceMetrics
from service.redisq.budget import BudgetIndex, BudgetedStore, charge_lua, entry_cost
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.schemas import InspectOptions, ErrorBody, HeatmapLink, ImageResult, InspectResponse, JobState

log = logging.getLogger(__name__)

LINK_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")  # secrets.token_urlsafe(24)
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{24}$")  # secrets.token_urlsafe(18)
FINAL_STATES: frozenset[str] = frozenset({"done", "failed"})


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


# ---------------------------------------------------------------------- job records
class JobRecord(BaseModel):
    """A job's state, stored as JSON at ``job:<id>``; the API's ``GET /v1/jobs/<id>`` shows it."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    category: str
    status: JobState
    created_at: datetime
    updated_at: datetime
    request_id: str | None = None
    options: InspectOptions = InspectOptions()
    filenames: list[str | None]
    attempts: int = 0
    worker: str | None = None
    result: InspectResponse | None = None
    error: ErrorBody | None = None


# Write a record unless the stored one is final: the first final state wins, so writing the
# same job twice (a redelivered or twice-claimed job) leaves the same final record.
def release_input_lua(expiry_key: str, sizes_key: str, job_id: str) -> str:
    """Lua that takes a job's input bytes out of its category's queued total (the keys of
    :meth:`JobRecords.inputs_keys`); a no-op for a job already released."""
    return f"""do
  local size = redis.call('HGET', {sizes_key}, {job_id})
  if size then
    redis.call('HINCRBY', {sizes_key}, '#total', -tonumber(size))
    redis.call('HDEL', {sizes_key}, {job_id})
  end
  redis.call('ZREM', {expiry_key}, {job_id})
end"""


# KEYS: record, images, inputs' expiry and bytes (JobRecords.inputs_keys), finished records'
# expiry and bytes (JobRecords.results_index). ARGV: record JSON, ttl ms, final ('1'/'0'),
# job id, key prefix, results budget, the record's cost, its member. Returns 0 when the stored
# record was final already, else 1 + the finished records evicted to make room for this one.
_WRITE_UNLESS_FINAL = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, rec = pcall(cjson.decode, current)
  if ok and type(rec) == 'table' and (rec['status'] == 'done' or rec['status'] == 'failed') then
    return 0
  end
end
local evicted = 0
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2])  -- the inputs left Redis: their bytes leave the budget
""" + release_input_lua("KEYS[3]", "KEYS[4]", "ARGV[4]") + """
""" + charge_lua("KEYS[5]", "KEYS[6]", "ARGV[5]", "ARGV[8]", "tonumber(ARGV[7])", "tonumber(ARGV[2])",
                 "tonumber(ARGV[6])") + """
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1 + evicted
"""


class JobRecords:
    """Job records and their input images."""

    def __init__(self, settings: Settings, conn: RedisConnection) -> None:
        self.conn = conn
        self.ttl_ms = int(settings.job_ttl_s * 1000)
        self.results_budget_bytes = settings.job_max_results_bytes

    def record_key(self, job_id: str) -> str:
        return self.conn.key("job", job_id)

    def images_key(self, job_id: str) -> str:
        return self.conn.key("job", job_id, "images")

    def inputs_keys(self, category: str) -> tuple[str, str]:
        """The category's queued inputs: when each job's expire (sorted set, job id by expiry
        in ms) and their sizes (hash, job id -> bytes, their sum under ``#total``)."""
        return self.conn.key("jobs-inputs", category, "expiry"), self.conn.key("jobs-inputs", category, "bytes")

    def results_index(self, category: str) -> BudgetIndex:
        """The category's finished records, within ``job_max_results_bytes``
        (:mod:`service.redisq.budget`)."""
        return BudgetIndex.under(self.conn.prefix, "job-results", category)

    def stage_create(self, pipe: Any, record: JobRecord, images: Sequence[bytes]) -> None:
        """Queue the commands creating a job on a (transaction) pipeline."""
        pipe.set(self.record_key(record.id), record.model_dump_json(), px=self.ttl_ms, nx=True)
        pipe.rpush(self.images_key(record.id), *images)
        pipe.pexpire(self.images_key(record.id), self.ttl_ms)

    def stage_write(self, pipe: Any, record: JobRecord) -> None:
        """Queue an idempotent write of ``record`` (a final one also drops the inputs)."""
        pipe.eval(_WRITE_UNLESS_FINAL, 6, *self._write_args(record))

    async def write(self, record: JobRecord) -> bool:
        """Store ``record`` unless the job already reached a final state; True if written."""
        written = await self.conn.run("job_write", lambda r: r.eval(_WRITE_UNLESS_FINAL, 6,
                                                                    *self._write_args(record)))
        return bool(written)

    def _write_args(self, record: JobRecord) -> list[Any]:
        final = "1" if record.status in FINAL_STATES else "0"
        data = record.model_dump_json()
        member = self.record_key(record.id)[len(self.conn.prefix):]
        results = self.results_index(record.category)
        return [self.record_key(record.id), self.images_key(record.id), *self.inputs_keys(record.category),
                results.expiry, results.sizes,
                data, self.ttl_ms, final, record.id, self.conn.prefix, self.results_budget_bytes,
                entry_cost(member, len(data)), member]

    async def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        raw = await self.conn.run("job_get", lambda r: r.get(self.record_key(job_id)))
        return None if raw is None else JobRecord.model_validate_json(raw)

    async def load(self, job_ids: Sequence[str]) -> list[tuple[JobRecord | None, list[bytes]]]:
        """Records and input images of several jobs in one round trip."""
        async def read(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.get(self.record_key(job_id))
                    pipe.lrange(self.images_key(job_id), 0, -1)
                return await pipe.execute()

        raw = await self.conn.run("job_load", read)
        out: list[tuple[JobRecord | None | Unreadable, list[bytes]]] = []
        for i in range(len(job_ids)):
            record, images = raw[2 * i], raw[2 * i + 1]
            out.append((None if record is None else _record_or_unreadable(record), list(images or [])))
        return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Unreadable:
    """A stored job record that does not validate (written by another version, or corrupted):
    dead-lettered with this reason, never redelivered forever."""

    reason: str


def _record_or_unreadable(raw: bytes | str) -> JobRecord | Unreadable:
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError as exc:
        return Unreadable(f"the job record does not validate: {exc.error_count()} error(s), first: "
                          f"{exc.errors()[0]['msg']}")


def new_job_id() -> str:
    return secrets.token_urlsafe(18)
