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
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["HEARTBEAT_S", "MISSED_BEATS", "WorkerHeartbeats"]
