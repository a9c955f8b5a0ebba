"""Job records and their input images in Redis (the streams that queue them are
:mod:`service.redisq.jobs`).

Keys (under ``MSFLOW_REDIS_PREFIX``): ``job:<id>`` (the :class:`JobRecord`, JSON) and
``job:<id>:images`` (the uploads); ``jobs-inputs:<category>:*``, the queued inputs' bytes
against ``job_max_backlog_bytes``; ``budget:job-results:<category>:*``, what finished records
hold against ``job_max_results_bytes`` (:mod:`service.redisq.budget`).

Writes are idempotent, for a job may be run twice (redelivered, or claimed from a stalled
worker that then wakes): the first final state wins, and a state that is not final never
re-creates a record that is gone (evicted or expired: nothing would ever run it again).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError

from service.config import Settings
from service.redisq.budget import BudgetIndex, charge_lua, entry_cost
from service.redisq.connection import RedisConnection
from service.schemas import ErrorBody, InspectOptions, InspectResponse, JobState

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{24}$")  # secrets.token_urlsafe(18)
FINAL_STATES: frozenset[str] = frozenset({"done", "failed"})


def new_job_id() -> str:
    return secrets.token_urlsafe(18)


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
    # With an Idempotency-Key: what was asked (options, file names, images' sha256), so that
    # the key sent again with another request is told apart from a resubmission.
    request_digest: str | None = None
    # Whose job it is (the API's client_scope: a digest of the key presented, empty on an open
    # API): GET /v1/jobs/<id> answers no other client. None: written by a version before it.
    client: str | None = None


@dataclass(frozen=True)
class Unreadable:
    """A stored job record that does not validate (written by another version, or corrupted):
    dead-lettered with this reason, never redelivered forever."""

    reason: str


@dataclass(frozen=True)
class FinalWrite:
    """What a final write did: ``written`` False when the job was final already (another
    worker's write won, or a repeated write), and the older records it evicted."""

    written: bool
    evicted: int = 0


class RecordTooLarge(ValueError):
    """A finished record larger than its category's whole results budget. Never written: it
    would evict every other finished record and still overrun the budget."""

    def __init__(self, size: int, budget: int) -> None:
        super().__init__(f"the job's result is {size} bytes, more than MSFLOW_JOB_MAX_RESULTS_BYTES ({budget}) "
                         "holds for all of its category's finished jobs; ask for heatmap=url or heatmap=none, or "
                         "send fewer images per job")


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
# job id, key prefix, results budget, the record's cost, its member. Returns 0 when nothing
# was written (the stored record was final already, or a state that is not final found no
# record), else 1 + the finished records evicted to make room for this one.
# A final record is kept job_ttl_s from now; one that is not final keeps its expiry, job_ttl_s
# from the submission, as its images, their charge and its stream entry do. Renewed by each
# write ("running", a failed attempt), a record outlived its images: a retry late in the job's
# life found the job but not its images, and failed inputs_missing for good.
_WRITE_UNLESS_FINAL = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, rec = pcall(cjson.decode, current)
  if ok and type(rec) == 'table' and (rec['status'] == 'done' or rec['status'] == 'failed') then
    return 0
  end
elseif ARGV[3] ~= '1' then
  return 0
end
local evicted = 0
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[2])  -- the inputs left Redis: their bytes leave the budget
""" + release_input_lua("KEYS[3]", "KEYS[4]", "ARGV[4]") + """
""" + charge_lua("KEYS[5]", "KEYS[6]", "ARGV[5]", "ARGV[8]", "tonumber(ARGV[7])", "tonumber(ARGV[2])",
                 "tonumber(ARGV[6])") + """
end
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
end
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

    def stage_write(self, pipe: Any, record: JobRecord, check_fit: bool = True) -> None:
        """Queue an idempotent write of ``record`` (a final one also drops the inputs). Raises
        :class:`RecordTooLarge`, before anything is queued, for a finished record larger than
        the whole results budget, unless ``check_fit`` is False (a failed record: an error,
        not a result, and the job's outcome)."""
        pipe.eval(_WRITE_UNLESS_FINAL, 6, *self._write_args(record, check_fit))

    async def write(self, record: JobRecord) -> bool:
        """Store ``record`` unless the job already reached a final state (or, for a state that
        is not final, unless its record is gone); True if written."""
        written = await self.conn.run("job_write", lambda r: r.eval(_WRITE_UNLESS_FINAL, 6,
                                                                    *self._write_args(record, True)))
        return bool(written)

    def _write_args(self, record: JobRecord, check_fit: bool) -> list[Any]:
        final = "1" if record.status in FINAL_STATES else "0"
        data = record.model_dump_json()
        member = self.record_key(record.id)[len(self.conn.prefix):]
        cost = entry_cost(member, len(data))
        if final == "1" and check_fit and cost > self.results_budget_bytes:
            raise RecordTooLarge(len(data), self.results_budget_bytes)
        results = self.results_index(record.category)
        return [self.record_key(record.id), self.images_key(record.id), *self.inputs_keys(record.category),
                results.expiry, results.sizes,
                data, self.ttl_ms, final, record.id, self.conn.prefix, self.results_budget_bytes, cost, member]

    async def get(self, job_id: str) -> JobRecord | Unreadable | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        raw = await self.conn.run("job_get", lambda r: r.get(self.record_key(job_id)))
        return None if raw is None else _record_or_unreadable(raw)

    async def peek(self, category: str,
                   job_ids: Sequence[str]) -> list[tuple[JobRecord | Unreadable | None, int | None]]:
        """Records of several jobs of ``category`` and the bytes of their images, in one round
        trip, without the images: a worker takes room for them before it fetches them
        (:meth:`images`). The bytes are the queue's own accounting (``inputs_keys``, written with
        the images at submission); None where it has none (a job queued by a version before it)."""
        sizes_key = self.inputs_keys(category)[1]

        async def read(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.get(self.record_key(job_id))
                    pipe.hget(sizes_key, job_id)
                return await pipe.execute()

        raw = await self.conn.run("job_peek", read)
        out: list[tuple[JobRecord | Unreadable | None, int | None]] = []
        for i in range(len(job_ids)):
            record, size = raw[2 * i], raw[2 * i + 1]
            out.append((None if record is None else _record_or_unreadable(record),
                        None if size is None else int(size)))
        return out

    async def images(self, job_ids: Sequence[str]) -> list[list[bytes]]:
        """The input images of several jobs, in one round trip (empty for a job whose images are gone)."""
        async def read(r: aioredis.Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.lrange(self.images_key(job_id), 0, -1)
                return await pipe.execute()

        return [list(images or []) for images in await self.conn.run("job_images", read)]


def _record_or_unreadable(raw: bytes | str) -> JobRecord | Unreadable:
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError as exc:
        return Unreadable(f"the job record does not validate: {exc.error_count()} error(s), first: "
                          f"{exc.errors()[0]['msg']}")
