"""Byte budgets for what Redis keeps on a TTL: heatmap links, cached results, finished jobs.

A TTL bounds how long an entry lives, not how many bytes live at once: the steady state is
the write rate times the TTL. Heatmap links at 600 s and a few hundred 2048² heatmaps a
second are gigabytes, and Compose runs Redis with ``maxmemory`` and ``noeviction``, where a
full Redis refuses every write: job submissions, threshold changes and the next links with
it. So each of these stores also has a budget in bytes, and a write that would pass it first
evicts the entries that would expire soonest (for one TTL, the oldest): an old link or cached
result is worth less than a new one, and a job's result is kept as long as the budget allows,
up to its TTL.

Each budgeted store has an index beside its entries: a sorted set (member -> expiry in ms)
and a hash (member -> bytes charged, their sum under ``#total``). A member is an entry's key
without the connection's prefix. Writes go through one Lua script (:func:`charge_lua`
inside it), so the index and the entries change together. The scripts name the evicted keys
from the index rather than declaring them, as standalone Redis allows (not Redis Cluster).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from service.config import Settings
from service.redisq.connection import RedisConnection, RedisUnavailable

# Redis's own bytes per entry beyond its value, measured on Redis 7.0 (jemalloc) with 20,000
# entries per store: the key and its TTL 185-249 bytes, the index's sorted-set and hash
# entries 229-357, growing with the member's length (28-86 characters). Charged with the
# value, so that many small entries (a cached ``heatmap=none`` result is ~400 bytes) cannot
# hold more than twice their budget.
ENTRY_OVERHEAD_BYTES = 350
OVERHEAD_PER_MEMBER_CHAR = 3

# Index entries of keys that expired by themselves are dropped this many at a time per write:
# enough to keep up (each write adds one), few enough to keep a write's script short.
SWEEP_PER_WRITE = 32


def entry_cost(member: str, value_bytes: int) -> int:
    """The bytes an entry is charged: its value plus Redis's own per-entry bytes."""
    return value_bytes + ENTRY_OVERHEAD_BYTES + OVERHEAD_PER_MEMBER_CHAR * len(member)


@dataclass(frozen=True)
class BudgetIndex:
    """One store's index keys (full keys, prefix included)."""

    expiry: str
    sizes: str

    @classmethod
    def under(cls, prefix: str, *parts: str) -> "BudgetIndex":
        name = prefix + "budget:" + ":".join(parts)
        return cls(expiry=name + ":expiry", sizes=name + ":bytes")


def charge_lua(expiry: str, sizes: str, prefix: str, member: str, cost: str, ttl_ms: str, budget: str) -> str:
    """Lua (a ``do ... end`` block) that makes room for one entry and charges it; each
    argument is a Lua expression. Times are Redis's own (``TIME``), the clock its TTLs run
    on, not the writer's. Drops index entries whose keys expired, takes back the
    charge of an entry being overwritten, evicts (DEL) the soonest-expiring entries while the
    total would pass ``budget``, then records the entry. Adds the evictions to a Lua local
    ``evicted`` (those whose keys were still there), which the enclosing script declares.
    The caller writes the entry itself. An entry costing more than the budget evicts every
    other and is charged anyway: callers that may drop an entry check its cost first."""
    return f"""do
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000  -- ms, to the microsecond: write order
  for _, gone in ipairs(redis.call('ZRANGEBYSCORE', {expiry}, '-inf', now, 'LIMIT', 0, {SWEEP_PER_WRITE})) do
    local size = redis.call('HGET', {sizes}, gone)
    if size then redis.call('HINCRBY', {sizes}, '#total', -tonumber(size)) end
    redis.call('HDEL', {sizes}, gone)
    redis.call('ZREM', {expiry}, gone)
  end
  local old = redis.call('HGET', {sizes}, {member})
  if old then
    redis.call('HINCRBY', {sizes}, '#total', -tonumber(old))
    redis.call('HDEL', {sizes}, {member})
    redis.call('ZREM', {expiry}, {member})
  end
  local total = tonumber(redis.call('HGET', {sizes}, '#total')) or 0
  while total + {cost} > {budget} do
    local oldest = redis.call('ZPOPMIN', {expiry})
    if #oldest == 0 then break end
    local victim = oldest[1]
    local size = tonumber(redis.call('HGET', {sizes}, victim)) or 0
    redis.call('HDEL', {sizes}, victim)
    -- An entry past its expiry is gone already; a key of that name now is a newer write
    -- outside this store (a job resubmitted under its idempotency key), never deleted here.
    if tonumber(oldest[2]) > now and redis.call('DEL', {prefix} .. victim) == 1 then evicted = evicted + 1 end
    total = tonumber(redis.call('HINCRBY', {sizes}, '#total', -size))
  end
  redis.call('ZADD', {expiry}, now + {ttl_ms}, {member})
  redis.call('HSET', {sizes}, {member}, {cost})
  redis.call('HINCRBY', {sizes}, '#total', {cost})
end"""


# KEYS: the store's index (expiry, sizes). ARGV: prefix, budget, then per entry: member,
# ttl ms, cost, value. Returns how many entries were evicted.
PUT_LUA = """
local evicted = 0
local prefix, budget = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 4 do
  local member, ttl, cost = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
""" + charge_lua("KEYS[1]", "KEYS[2]", "prefix", "member", "cost", "ttl", "budget") + """
  redis.call('SET', prefix .. member, ARGV[i + 3], 'PX', ttl)
end
return evicted
"""

PUT_SHA = hashlib.sha1(PUT_LUA.encode()).hexdigest()


async def run_script(r: aioredis.Redis, script: str, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """EVALSHA, loading the script on a miss: a hot path should not send the script's text
    (and have Redis hash it) on every call."""
    try:
        return await r.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return await r.eval(script, len(keys), *keys, *args)


class BudgetedStore:
    """Entries written through :data:`PUT_LUA` under one index and one budget."""

    def __init__(self, conn: RedisConnection, name: str, budget_bytes: int) -> None:
        self.conn = conn
        self.index = BudgetIndex.under(conn.prefix, name)
        self.budget_bytes = budget_bytes

    def member(self, key: str) -> str:
        assert key.startswith(self.conn.prefix), key
        return key[len(self.conn.prefix):]

    def fits(self, key: str, value: bytes) -> bool:
        return entry_cost(self.member(key), len(value)) <= self.budget_bytes

    async def put(self, op: str, entries: Sequence[tuple[str, bytes, int]]) -> int:
        """Write ``(key, value, ttl_ms)`` entries (each must :meth:`fit`), evicting as needed;
        returns how many entries were evicted. Raises :class:`RedisUnavailable`."""
        args: list[Any] = [self.conn.prefix, self.budget_bytes]
        for key, value, ttl_ms in entries:
            member = self.member(key)
            args += [member, ttl_ms, entry_cost(member, len(value)), value]
        keys = (self.index.expiry, self.index.sizes)
        size = sum(len(value) for _, value, _ in entries)
        return int(await self.conn.run(op, lambda r: run_script(r, PUT_LUA, PUT_SHA, keys, args), payload_bytes=size))


def budgets_bytes(settings: Settings, categories: int) -> int:
    """What the service may keep in Redis with every store at its budget."""
    per_category = settings.job_max_backlog_bytes + settings.job_max_results_bytes
    return per_category * categories + settings.heatmap_max_bytes + settings.cache_max_bytes


async def maxmemory_warning(conn: RedisConnection, settings: Settings, categories: int) -> str | None:
    """A warning when the budgets together pass Redis's ``maxmemory`` (the first store to fill
    it would then refuse every write), or None: within it, no limit set, or not readable (a
    managed Redis may refuse CONFIG; the budgets still hold, only this check is skipped)."""
    try:
        reply = await conn.run("config_get", lambda r: r.config_get("maxmemory"))
        maxmemory = int(reply.get("maxmemory") or 0)
    except (RedisUnavailable, ValueError):
        return None
    need = budgets_bytes(settings, categories)
    if maxmemory <= 0 or need <= maxmemory:
        return None
    mib = 1024 * 1024
    return (f"Redis's maxmemory is {maxmemory / mib:.0f} MiB, but the service's byte budgets come to "
            f"{need / mib:.0f} MiB for {categories} categories: (job backlog "
            f"{settings.job_max_backlog_bytes / mib:.0f} + job results {settings.job_max_results_bytes / mib:.0f}) "
            f"x {categories} + heatmap links {settings.heatmap_max_bytes / mib:.0f} + cache "
            f"{settings.cache_max_bytes / mib:.0f}. Redis may fill before a budget stops a store, and a full "
            "Redis (noeviction) refuses job submissions and threshold changes: lower MSFLOW_*_MAX_*_BYTES or "
            "raise maxmemory")
