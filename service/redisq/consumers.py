"""A bound on the consumers of the job streams' group (:class:`IdleConsumers`).

XREADGROUP adds a consumer to the group the first time a name is handed entries, and
nothing removes it: a worker's name is host-pid by default, so every restart (every
Kubernetes pod restart) of a worker that ran a job left one more consumer on its category's
stream for the life of the stream, and ``XINFO CONSUMERS`` (each one held in Redis's memory)
grew without bound. So each worker deletes, at start and then every half
``job_consumer_idle_s``, the consumers that hold no pending entry and have been idle for
``job_consumer_idle_s``: a dead worker's, once the others have claimed its jobs through the
claim path (:meth:`~service.redisq.jobs.JobQueue.claim` moves them, leaving it none pending).

Never one with pending entries: XGROUP DELCONSUMER drops them from the group's pending list,
where no claim would find them again (lost jobs). The check and the delete are one script,
so a consumer handed a job between them cannot lose it. Never the worker itself. A live
worker handed nothing for that long may be deleted (Redis 7.0 counts a consumer's idle time
from its last delivery or claim, not its last read): it held nothing, and its next delivery
adds it back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from service.redisq.connection import RedisConnection, RedisUnavailable

log = logging.getLogger(__name__)

# KEYS: job streams. ARGV: group, the consumer to keep (the caller), idle ms. Returns the
# deleted names per stream. A stream or group not there yet (no worker made it) has none.
_PRUNE = """
local out = {}
for s, stream in ipairs(KEYS) do
  local deleted = {}
  local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, ARGV[1])
  if not consumers.err then
    for _, c in ipairs(consumers) do
      local f = {}
      for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
      if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[3]) then
        redis.call('XGROUP', 'DELCONSUMER', stream, ARGV[1], f['name'])
        deleted[#deleted + 1] = f['name']
      end
    end
  end
  out[s] = deleted
end
return out
"""


class IdleConsumers:
    """Deletes a job group's consumers that hold nothing and were not seen for ``idle_s``."""

    def __init__(self, conn: RedisConnection, group: str, idle_s: float) -> None:
        self.conn = conn
        self.group = group
        self.idle_ms = int(idle_s * 1000)

    @property
    def every_s(self) -> float:
        """How often a worker prunes: a dead worker's consumer lives at most 1.5 x idle_s."""
        return self.idle_ms / 2000

    async def prune(self, streams: Sequence[str], keep: str) -> dict[str, list[str]]:
        """Delete, on each of ``streams``, the idle consumers with no pending entry other than
        ``keep``; the names deleted, per stream. Raises
        :class:`~service.redisq.connection.RedisUnavailable`."""
        if not streams:
            return {}

        async def run(r: aioredis.Redis) -> Any:
            return await r.eval(_PRUNE, len(streams), *streams, self.group, keep, self.idle_ms)

        replies = await self.conn.run("prune_consumers", run)
        deleted = {stream: [_text(n) for n in names] for stream, names in zip(streams, replies)}
        for stream, names in deleted.items():
            if names:
                log.info("%s: deleted %d consumer(s) idle for over %.0f s with nothing pending: %s", stream,
                         len(names), self.idle_ms / 1e3, ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
        return deleted

    async def forever(self, streams: Callable[[], Sequence[str]], keep: str,
                      unavailable: Callable[[], None]) -> None:
        """:meth:`prune` now and every :attr:`every_s` until cancelled; a prune Redis fails
        (``unavailable`` is told) is tried at the next."""
        while True:
            try:
                await self.prune(streams(), keep)
            except RedisUnavailable:
                unavailable()
            await asyncio.sleep(self.every_s)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


__all__ = ["IdleConsumers"]
