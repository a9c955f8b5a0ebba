"""Which workers consume a category, from their heartbeats in Redis.

A queued job gives no sign of whether anything will ever run it: with no ``msflow worker``
alive it said ``queued`` until it expired a day later, and the client could not tell that
from a long queue. So each worker beats every :data:`HEARTBEAT_S`: per category it
consumes, ``workers:<category>`` (a sorted set) maps its name to the moment its beat runs
out (:data:`MISSED_BEATS` beats later, in Redis's clock), and the API counts the members
not run out yet. Why the expiry rather than the last beat as the score: readers need not
know the period a worker chose. A worker that stops says so (its member leaves); a killed
or frozen one drops out once its beat runs out; the sets themselves expire with their last
beat, so categories nobody consumes any more leave nothing behind.

:meth:`WorkerHeartbeats.census` reads the same count beside each stream's length for the
API's ``/metrics`` (``msflow_job_workers``, ``msflow_job_backlog``): a job's 202 said
``workers: 0`` to its client, but nothing told monitoring, so no alert could.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from service.redisq.connection import RedisConnection

HEARTBEAT_S = 5.0
MISSED_BEATS = 3  # a worker counts as gone after this many beats missed (a GC pause, a slow Redis)

# KEYS: one set per category. ARGV: worker name, how long this beat lasts (ms). Members whose
# beats ran out are dropped here, so a set holds the live workers and the recently dead only.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lasts = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + lasts, ARGV[1])
  redis.call('PEXPIRE', key, lasts)
end
return 1
"""

# KEYS: a category's set. Counts the workers whose beat has not run out (Redis's clock).
_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


@dataclass(frozen=True)
class JobCensus:
    """A category's async jobs as Redis has them now."""

    workers: int  # workers whose beat for the category has not run out
    backlog: int  # unfinished jobs (queued or running) in its stream


class WorkerHeartbeats:
    """Writes (worker side) and counts (API side) the heartbeats of the workers."""

    def __init__(self, conn: RedisConnection, every_s: float = HEARTBEAT_S) -> None:
        self.conn = conn
        self.every_s = every_s

    def key(self, category: str) -> str:
        return self.conn.key("workers", category)

    async def beat(self, worker: str, categories: Sequence[str]) -> None:
        """``worker`` consumes ``categories`` for the next :data:`MISSED_BEATS` periods.
        Raises :class:`~service.redisq.connection.RedisUnavailable`."""
        if categories:
            keys = [self.key(c) for c in categories]
            lasts_ms = int(self.every_s * MISSED_BEATS * 1000)
            await self.conn.run("worker_beat", lambda r: r.eval(_BEAT, len(keys), *keys, worker, lasts_ms))

    async def leave(self, worker: str, categories: Sequence[str]) -> None:
        """``worker`` stopped consuming ``categories`` (a clean stop: it need not run out)."""
        async def drop(r: aioredis.Redis) -> None:
            async with r.pipeline(transaction=False) as pipe:
                for category in categories:
                    pipe.zrem(self.key(category), worker)
                await pipe.execute()

        if categories:
            await self.conn.run("worker_leave", drop)

    async def alive(self, category: str) -> int:
        """How many workers consume ``category`` now. Raises
        :class:`~service.redisq.connection.RedisUnavailable`."""
        key = self.key(category)
        return int(await self.conn.run("workers_alive", lambda r: r.eval(_ALIVE, 1, key)))

    async def census(self, streams: Mapping[str, str], timeout_s: float) -> dict[str, JobCensus]:
        """Per category of ``streams`` (category -> its job stream's key): the live workers and
        the stream's length, in one pipelined round trip bounded by ``timeout_s`` (a scrape
        must not hang on a stalled Redis). Raises
        :class:`~service.redisq.connection.RedisUnavailable`, counted as ``job_census``.

        XLEN is the backlog, exactly: a finished or dead-lettered job leaves its stream (XACK +
        XDEL, :mod:`service.redisq.jobs`), so the entries are the jobs queued or running. The
        group's pending count plus its lag would say the same at more cost, but the lag is
        null once an unread entry was deleted (an expired job trimmed at a submission, Redis
        7.0), and there is no group before a first worker made it."""
        categories = list(streams)

        async def read(r: aioredis.Redis) -> list[Any]:
            async with asyncio.timeout(timeout_s):  # TimeoutError: counted by run, as a failure
                async with r.pipeline(transaction=False) as pipe:
                    for category in categories:
                        pipe.eval(_ALIVE, 1, self.key(category))
                        pipe.xlen(streams[category])
                    return await pipe.execute()

        if not categories:
            return {}
        replies = await self.conn.run("job_census", read)
        return {category: JobCensus(workers=int(replies[2 * i]), backlog=int(replies[2 * i + 1]))
                for i, category in enumerate(categories)}


__all__ = ["HEARTBEAT_S", "MISSED_BEATS", "JobCensus", "WorkerHeartbeats"]
