"""Async inspection jobs on Redis Streams: one stream per category, one consumer group.

``POST /v1/jobs/<category>`` stores the job (:class:`~service.redisq.records.JobRecord` + images)
and adds ``{job_id, category}`` to ``jobs:<category>`` in one MULTI. Workers
(:mod:`service.worker`) read with XREADGROUP in the group ``workers``: a message stays in
the group's pending list until the worker acknowledges it (XACK) after writing the final
record. Delivery guarantees, each for a reason:

* A worker that dies mid-job leaves its messages pending; any worker claims messages idle
  longer than ``job_claim_idle_s`` (XAUTOCLAIM), so no job is lost. A live worker keeps its
  messages fresh while it works (XCLAIM ... JUSTID, which resets the idle time without
  counting a delivery), so only a dead worker's jobs are taken over.
* Each delivery counts (XPENDING's ``times_delivered``): an attempt that fails is left
  pending for a later retry; when attempt ``job_max_attempts`` fails, or a job is delivered
  more often than that (it kills its workers), it goes to the ``jobs:dead-letter`` stream
  with its error, its record says ``failed``, and it is acknowledged, in one MULTI.
* Result writes are idempotent (:meth:`~service.redisq.records.JobRecords.stage_write`): the first
  final state wins, so a job processed twice ends in one final record.
* Submission and dead-lettering are Lua scripts keyed by the job id: redis-py retries a
  command whose reply was lost (a stalled Redis, a fork), and a retried script finds its
  own earlier run and does nothing, so one submission is one stream entry and one job is
  dead-lettered once.

Bounds: a finished job leaves its stream (XACK + XDEL), so a stream holds only unfinished
jobs and ``job_max_backlog`` caps it (a submission beyond answers 503, :class:`BacklogFull`),
and ``job_max_backlog_bytes`` caps their input bytes in Redis (10,000 jobs of up to 64 MiB
each were allowed before, about 670 GB a category: one client filled Redis in minutes, and a
full Redis refuses every write, links, cache and thresholds included);
a submission first trims entries older than ``job_ttl_s`` (their records are gone), so
jobs that expired unrun leave the backlog. The dead-letter
stream keeps about ``dead_letter_max`` entries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.exceptions import ResponseError

from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.consumers import IdleConsumers
from service.redisq.idempotency import (INLINE_DIGEST_BYTES, IdempotencyConflict, IdempotentJobUnreadable,
                                       job_id_for, request_digest)
from service.schemas import ErrorBody, InspectOptions, Upload
from service.redisq.records import FinalWrite, JobRecord, JobRecords, Unreadable, new_job_id, release_input_lua
from service.redisq.store import utcnow
from service.redisq.workers import WorkerHeartbeats

log = logging.getLogger(__name__)

GROUP = "workers"
_CLAIM_SCAN_STEPS = 8  # XAUTOCLAIM calls per claim at most (each scans ten entries per one asked for)

# KEYS: record, images, stream, inputs' expiry, inputs' bytes (JobRecords.inputs_keys).
# ARGV: record JSON, ttl ms, backlog cap, job id, category, bytes cap, bytes, images...
# Inputs whose time ran out (their keys expired unfinished) leave the budget here, a hundred
# at a time, and so does this job's own earlier charge (an idempotency key resubmitted after
# its job expired unswept: else its old bytes stayed counted for good); a finished job's
# leave it with its final write (store._WRITE_UNLESS_FINAL). Times are Redis's, as its TTLs
# and stream ids are: an API host's clock ahead or behind moved both ends of the budget.
# Entries older than the TTL (their record and images are gone: no worker can run them) leave
# the stream before the backlog is counted, exactly (XTRIM's "~" trims whole nodes of 100
# entries, none of a short stream): with no worker, expired jobs held the backlog full and
# every submission was 503 job_backlog_full for good.
# _ROOM is its checks alone, run first without the images (ARGV 1..7): a submission refused
# for a full backlog shipped all its bytes (64 MiB a request) to Redis to learn it, and each
# such request held them in Redis's query buffer meanwhile, memory the budget does not see.
# The first write is one Redis refuses past maxmemory (HINCRBY, by 0: nothing changes): Redis
# checks the limit only at a script's first write, and XTRIM, which it lets through there (it
# frees memory), let every later write of the submission past the limit of a noeviction Redis.
_CHECKS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HINCRBY', KEYS[5], '#total', 0)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local minid = string.format('%.0f', math.max(0, now - ttl)) .. '-0'
redis.call('XTRIM', KEYS[3], 'MINID', minid)
if redis.call('XLEN', KEYS[3]) >= tonumber(ARGV[3]) then return -1 end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)) do
""" + release_input_lua("KEYS[4]", "KEYS[5]", "id") + """
end
""" + release_input_lua("KEYS[4]", "KEYS[5]", "ARGV[4]") + """
local size = tonumber(ARGV[7])
if (tonumber(redis.call('HGET', KEYS[5], '#total')) or 0) + size > tonumber(ARGV[6]) then return -2 end
"""
_ROOM = _CHECKS + "return 1\n"
_SUBMIT = _CHECKS + """redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('DEL', KEYS[2])
for i = 8, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[4], 'category', ARGV[5])
redis.call('ZADD', KEYS[4], now + ttl, ARGV[4])
redis.call('HSET', KEYS[5], ARGV[4], size)
redis.call('HINCRBY', KEYS[5], '#total', size)
return 1
"""

# KEYS: dead-letter stream, job stream. ARGV: group, stream id, dlq max, fields...
# The job's entry still in its stream tells the first run: a retried run (or a second worker's,
# which claimed the job from a stalled one) finds it dropped and adds nothing; the XACK/XDEL are
# idempotent anyway. A marker key per entry did that before, kept job_ttl_s and counted by no
# budget: ~120 bytes of Redis a dead-lettered job for a day, at a client's submission rate.
_DEAD_LETTER = """
local first = #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) > 0
if first then
  local fields = {}
  for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if first then return 1 end
return 0
"""


class BacklogFull(RuntimeError):
    """The category's job stream holds ``job_max_backlog`` unfinished jobs, or their inputs
    ``job_max_backlog_bytes``."""


class JobMessage(BaseModel):
    """A stream entry: which job, of which category (everything else is in the record)."""

    job_id: str
    category: str

    def fields(self) -> dict[str, str]:
        return {"job_id": self.job_id, "category": self.category}

    @classmethod
    def parse(cls, fields: dict[Any, Any]) -> "JobMessage":
        return cls.model_validate({_text(k): _text(v) for k, v in fields.items()})


@dataclass(frozen=True)
class Submitted:
    """What a submission did: the job's record, and whether this call queued it (False: its
    Idempotency-Key named a job queued before, answered as it stands; nothing was queued)."""

    record: JobRecord
    queued: bool


@dataclass(frozen=True)
class Delivery:
    """One message handed to this worker: its stream id, the job, and the delivery count."""

    stream_id: str
    message: JobMessage
    deliveries: int

    @property
    def job_id(self) -> str:
        return self.message.job_id


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class JobQueue:
    """Submission (API side) and consumption (worker side) of the job streams."""

    def __init__(self, settings: Settings, conn: RedisConnection) -> None:
        self.settings = settings
        self.conn = conn
        self.records = JobRecords(settings, conn)
        self.workers = WorkerHeartbeats(conn)
        self.consumers = IdleConsumers(conn, GROUP, settings.job_consumer_idle_s)  # dead workers' consumers go
        self.claim_idle_ms = int(settings.job_claim_idle_s * 1000)
        self._claim_cursor: dict[str, str] = {}  # per category: where the last XAUTOCLAIM scan stopped

    def stream(self, category: str) -> str:
        return self.conn.key("jobs", category)

    @property
    def dead_letter_stream(self) -> str:
        return self.conn.key("jobs:dead-letter")

    # ------------------------------------------------------------------ API side
    async def submit(self, category: str, uploads: Sequence[Upload], options: InspectOptions,
                     request_id: str | None, idempotency_key: str | None = None, client: str = "") -> JobRecord:
        """:meth:`enqueue`'s record."""
        return (await self.enqueue(category, uploads, options, request_id, idempotency_key, client)).record

    async def enqueue(self, category: str, uploads: Sequence[Upload], options: InspectOptions,
                      request_id: str | None, idempotency_key: str | None = None, client: str = "") -> Submitted:
        """Store the job and queue it, atomically. Raises :class:`~service.redisq.connection.RedisUnavailable`.

        ``idempotency_key`` (the client's ``Idempotency-Key``): the job id derives from it, so a
        client that resubmits after an answer it never got (a timeout, a 503 while Redis
        stalled) gets the same job back (its record as stored: queued, running or finished)
        instead of a second one (:attr:`Submitted.queued` False). The same key with another
        request raises :class:`IdempotencyConflict`: its answer would be another request's result.
        ``client``: whose key it is (:func:`job_id_for`); another client's same key is another job."""
        now = utcnow()
        job_id = new_job_id() if idempotency_key is None else job_id_for(category, idempotency_key, client)
        digest = None
        if idempotency_key is not None:  # hashing megabytes off the event loop, as the result cache does
            inline = sum(len(u.data) for u in uploads) <= INLINE_DIGEST_BYTES
            digest = (request_digest(category, uploads, options) if inline
                      else await asyncio.to_thread(request_digest, category, uploads, options))
        record = JobRecord(id=job_id, category=category, status="queued", created_at=now, updated_at=now,
                           request_id=request_id, options=options, filenames=[u.filename for u in uploads],
                           request_digest=digest, client=client)

        keys = [self.records.record_key(record.id), self.records.images_key(record.id), self.stream(category),
                *self.records.inputs_keys(category)]
        checks = [record.model_dump_json(), self.records.ttl_ms, self.settings.job_max_backlog, record.id, category,
                  self.settings.job_max_backlog_bytes, sum(len(u.data) for u in uploads)]
        # Room first, without the images (the submission checks again, atomically): a refused or
        # resubmitted job then costs Redis a few hundred bytes, not its images.
        room = int(await self.conn.run("job_room", lambda r: r.eval(_ROOM, len(keys), *keys, *checks)))
        self._raise_if_full(category, room)
        if room == 0 and (stored := await self._stored(job_id, digest)) is not None:
            return Submitted(stored, queued=False)
        args = [*checks, *(u.data for u in uploads)]
        queued = int(await self.conn.run("job_submit", lambda r: r.eval(_SUBMIT, len(keys), *keys, *args)))
        self._raise_if_full(category, queued)
        if queued == 0:  # the key's job exists: the same request sent again, or another one
            # Gone between the script and this read (expired, evicted): nothing was queued now.
            return Submitted(await self._stored(job_id, digest) or record, queued=False)
        return Submitted(record, queued=True)

    async def check_room(self, category: str, idempotency_key: str | None = None, client: str = "",
                         size: int = 1) -> None:
        """Raise :class:`BacklogFull` when a job of ``size`` image bytes (at least 1) would find
        no room now: asked before the request's body is read, which a full backlog otherwise
        had the API read whole (up to max_request_bytes, holding the upload byte budget) to
        refuse. :meth:`enqueue` checks again, atomically. A key whose job exists passes (its
        resubmission is answered with the job)."""
        job_id = new_job_id() if idempotency_key is None else job_id_for(category, idempotency_key, client)
        keys = [self.records.record_key(job_id), self.records.images_key(job_id), self.stream(category),
                *self.records.inputs_keys(category)]
        checks = ["", self.records.ttl_ms, self.settings.job_max_backlog, job_id, category,
                  self.settings.job_max_backlog_bytes, max(1, size)]
        self._raise_if_full(category, int(await self.conn.run(
            "job_room", lambda r: r.eval(_ROOM, len(keys), *keys, *checks))))

    def _raise_if_full(self, category: str, reply: int) -> None:
        if reply == -1:
            raise BacklogFull(f"{category}: {self.settings.job_max_backlog} jobs are waiting; retry later")
        if reply == -2:
            raise BacklogFull(f"{category}: the waiting jobs' images fill the queue's "
                              f"{self.settings.job_max_backlog_bytes} bytes; retry later")

    async def _stored(self, job_id: str, digest: str | None) -> JobRecord | None:
        """The job an Idempotency-Key named, if its record is there; raises
        :class:`IdempotencyConflict` when it was another request's, and
        :class:`IdempotentJobUnreadable` when its record cannot be read."""
        stored = await self.records.get(job_id)
        if isinstance(stored, Unreadable):
            raise IdempotentJobUnreadable(job_id, stored.reason)
        if stored is None:
            return None
        if stored.request_digest is not None and stored.request_digest != digest:
            raise IdempotencyConflict(job_id)
        return stored

    # ------------------------------------------------------------------ worker side
    async def ensure_groups(self, categories: Sequence[str]) -> None:
        """Create the consumer group of each stream (from id 0: jobs queued before any worker
        existed are read too)."""
        async def create(r: aioredis.Redis, stream: str) -> None:
            try:
                await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        for category in categories:
            await self.conn.run("xgroup_create", lambda r, c=category: create(r, self.stream(c)))

    async def read(self, categories: Sequence[str], consumer: str, count: int,
                   block_s: float) -> list[Delivery]:
        """New messages (up to ``count`` per stream), waiting up to ``block_s`` for the first."""
        streams = {self.stream(c): ">" for c in categories}
        by_stream = {self.stream(c): c for c in categories}
        reply = await self.conn.run("xreadgroup", lambda r: r.xreadgroup(
            GROUP, consumer, streams, count=count, block=max(1, int(block_s * 1000))))
        out = []
        for stream, messages in reply or []:  # RESP2 (the client pins protocol 2): [[stream, [(id, fields)]]]
            category = by_stream[_text(stream)]
            for stream_id, fields in messages:
                delivery = await self._parse(category, _text(stream_id), fields, 1, consumer)
                if delivery is not None:
                    out.append(delivery)
        return out

    async def _parse(self, category: str, stream_id: str, fields: dict[Any, Any], delivered: int,
                     consumer: str) -> Delivery | None:
        """The entry as a delivery, or None when it is malformed: then it is dead-lettered with
        the reason and acknowledged on the stream it came from (not one its fields name)."""
        try:
            message = JobMessage.parse(fields)
            if message.category != category:
                raise ValueError(f"its category field says {message.category!r}")
        except (ValidationError, ValueError, UnicodeDecodeError) as exc:
            reason = f"malformed entry on the {category} stream: {str(exc).splitlines()[0][:200]}"
            job_id = _text(fields.get(b"job_id") or fields.get("job_id") or "?")[:64]
            bogus = Delivery(stream_id, JobMessage.model_construct(job_id=job_id, category=category), delivered)
            await self.dead_letter(bogus, None, ErrorBody(code="malformed_entry", message=reason), consumer)
            return None
        return Delivery(stream_id, message, delivered)

    async def claim(self, category: str, consumer: str, count: int) -> list[Delivery]:
        """Messages of dead workers: pending and idle past ``job_claim_idle_s`` (XAUTOCLAIM),
        with their delivery counts (XPENDING).

        XAUTOCLAIM looks at ten entries per one asked for, from its cursor: from the start
        every time, ten live workers' jobs ahead of a dead one's hid it until they finished.
        So the scan goes on from where the last one stopped, a few steps per call, and wraps."""
        stream = self.stream(category)
        messages: list[tuple[str, Any]] = []
        for _ in range(_CLAIM_SCAN_STEPS):
            cursor = self._claim_cursor.get(category, "0-0")
            reply = await self.conn.run("xautoclaim", lambda r: r.xautoclaim(
                stream, GROUP, consumer, self.claim_idle_ms, cursor, count=count))
            self._claim_cursor[category] = _text(reply[0])
            messages = [(_text(i), f) for i, f in reply[1] if f]  # entries deleted from the stream have no fields
            if messages or self._claim_cursor[category] == "0-0":  # found, or the scan wrapped
                break
        if not messages:
            return []

        async def counts(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for stream_id, _ in messages:
                    pipe.xpending_range(stream, GROUP, min=stream_id, max=stream_id, count=1)
                return await pipe.execute()

        pending = await self.conn.run("xpending", counts)
        out = []
        for (stream_id, fields), info in zip(messages, pending):
            delivered = int(info[0]["times_delivered"]) if info else 1
            delivery = await self._parse(category, stream_id, fields, delivered, consumer)
            if delivery is not None:
                out.append(delivery)
        log.info("%s: claimed %d job(s) pending for over %.1f s (a dead worker's, or a failed attempt's)",
                 category, len(out), self.claim_idle_ms / 1e3)
        return out

    async def keep_alive(self, category: str, consumer: str, stream_ids: Sequence[str]) -> None:
        """Reset the idle time of messages this worker still works on (no delivery counted).
        Should another worker have claimed one meanwhile (this one stalled past the idle
        timeout), both finish it; the idempotent final write keeps one outcome."""
        if stream_ids:
            await self.conn.run("xclaim", lambda r: r.xclaim(
                self.stream(category), GROUP, consumer, 0, list(stream_ids), justid=True))

    async def complete(self, delivery: Delivery, record: JobRecord) -> FinalWrite:
        """Write the final record (idempotently), acknowledge and drop the entry, in one MULTI.
        Raises :class:`~service.redisq.records.RecordTooLarge` (nothing written) for a record
        larger than the whole ``job_max_results_bytes``."""
        async def done(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=True) as pipe:
                self.records.stage_write(pipe, record)
                pipe.xack(self.stream(delivery.message.category), GROUP, delivery.stream_id)
                pipe.xdel(self.stream(delivery.message.category), delivery.stream_id)
                return await pipe.execute()

        return _final_write(int((await self.conn.run("job_complete", done))[0]))

    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge and drop an entry with nothing (more) to do."""
        async def drop(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream(delivery.message.category), GROUP, delivery.stream_id)
                pipe.xdel(self.stream(delivery.message.category), delivery.stream_id)
                await pipe.execute()

        await self.conn.run("xack", drop)

    async def dead_letter(self, delivery: Delivery, record: JobRecord | None, error: ErrorBody,
                          worker: str, attempts: int | None = None) -> FinalWrite:
        """Mark the job failed with ``error`` (the record, whose result is dropped: a failed
        record holds an error; with it go the job's images and their charge), add it to the
        dead-letter stream, acknowledge: one MULTI. ``record`` None (an entry too malformed to
        name its job for sure): only the stream entry is dead-lettered. ``attempts``: the runs
        it had, when not its deliveries (a delivery that only buries it ran nothing)."""
        attempts = delivery.deliveries if attempts is None else attempts
        fields = {"job_id": delivery.job_id, "category": delivery.message.category,
                  "stream_id": delivery.stream_id, "attempts": str(attempts), "error_code": error.code,
                  "error_message": error.message, "worker": worker, "failed_at": utcnow().isoformat()}

        stream = self.stream(delivery.message.category)
        keys = [self.dead_letter_stream, stream]
        args = [GROUP, delivery.stream_id, self.settings.dead_letter_max,
                *(x for kv in fields.items() for x in kv)]

        async def bury(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=True) as pipe:
                if record is not None:  # idempotent: the first final state wins
                    self.records.stage_write(pipe, record.model_copy(update={
                        "status": "failed", "result": None, "error": error, "attempts": attempts,
                        "worker": worker, "updated_at": utcnow()}), check_fit=False)
                pipe.eval(_DEAD_LETTER, len(keys), *keys, *args)
                return await pipe.execute()

        replies = await self.conn.run("dead_letter", bury)
        log.warning("job %s (%s) dead-lettered after %d attempt(s): %s: %s", delivery.job_id,
                    delivery.message.category, attempts, error.code, error.message)
        return _final_write(int(replies[0])) if record is not None else FinalWrite(bool(int(replies[0])))


def _final_write(reply: int) -> FinalWrite:
    """The record script's reply: 0 when nothing was written, else 1 + the evictions."""
    return FinalWrite(written=reply > 0, evicted=max(0, reply - 1))
