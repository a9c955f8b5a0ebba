"""What the Redis byte budgets hold, and what a budgeted write costs.

    python -m loadtests.redis_budgets
    python -m loadtests.redis_budgets --links 400 --link-bytes 20000 --budgets-mib 1 4 --puts 4000

Starts its own ``redis-server`` (loopback, a free port, nothing on disk) and, in this process:

1. **A flood of heatmap links** (``HeatmapLinks.put``, as a worker writes them: Redis only),
   ``--links`` PNG-sized random values per budget: Redis's ``used_memory`` before and after,
   for each of ``--budgets-mib`` and for a budget far above the flood (what a TTL alone left).
2. **A cached result's write** (``ResultCache.put_many``, one ``heatmap=none`` result per
   call, 8 coroutines on uvloop, as the API writes a miss): this process's CPU per write and
   Redis's own time per call (``INFO commandstats``), against a plain ``SET`` of the same
   bytes in the same run (what the cache wrote before its budget). The budget is a quarter of
   what the writes bring, so that most writes evict.

Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from loadtests.redis_proc import RedisProc
from service.config import Settings, largest_heatmap_png_bytes
from service.metrics import ServiceMetrics
from service.redisq.budget import entry_cost
from service.redisq.connection import RedisConnection
from service.redisq.store import CachedResult, HeatmapLinks, ResultCache
from service.schemas import ImageResult, InspectOptions

MiB = 1024 * 1024


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def flood_links(redis: RedisProc, budget: int, links: int, link_bytes: int) -> float:
    """Redis's used_memory growth (bytes) after ``links`` links into ``budget``."""
    r = redis.client()
    r.flushall()
    settings = Settings(redis_url=redis.url, redis_prefix="bench:", heatmap_max_bytes=budget, heatmap_ttl_s=600,
                        max_heatmap_pixels=max(1, (budget - largest_heatmap_png_bytes(0)) // 4))
    conn = RedisConnection(settings, breaker_s=0.0)
    store = HeatmapLinks(settings, conn, memory=False)
    before = r.info("memory")["used_memory"]
    for _ in range(links):
        await store.put(os.urandom(link_bytes), 256, 256)
    await conn.aclose()
    return r.info("memory")["used_memory"] - before


def cached_result() -> CachedResult:
    result = ImageResult(index=0, filename="part.jpg", score=0.21, raw_score=1.04, threshold=1.5,
                         is_anomalous=False, verdict="ok", ng_threshold=2.5, model_version="20261206-000000",
                         batch_size=4, heatmap=None,
                         timings_ms={"decode": 0.4, "queue": 1.2, "engine": 0.1, "render": 0.05, "total": 1.9},
                         image_size={"width": 256, "height": 256}, regions=[])
    return CachedResult(engine="onnxruntime-cpu", result=result)


async def time_writes(redis: RedisProc, puts: int, write: Callable[[str], Awaitable[object]],
                      keys: list[str], commands: tuple[str, ...]) -> tuple[float, float, int]:
    """(this process's CPU per write in µs, Redis's µs per call of ``commands``, calls), 8
    writers at once. A script's time includes the commands it calls (which commandstats also
    counts on their own: hence the names)."""
    r = redis.client()
    r.config_resetstat()

    async def writer(part: list[str]) -> None:
        for key in part:
            await write(key)

    started = _cpu_s()
    await asyncio.gather(*(writer(keys[i::8]) for i in range(8)))
    cpu_us = 1e6 * (_cpu_s() - started) / puts
    stats = r.info("commandstats")
    names = {f"cmdstat_{c}" for c in commands}
    calls = sum(v["calls"] for k, v in stats.items() if k in names)
    usec = sum(v["usec"] for k, v in stats.items() if k in names)
    return cpu_us, usec / max(1, calls), calls


async def cache_writes(redis: RedisProc, puts: int, rounds: int) -> list[str]:
    entry = cached_result()
    data = entry.model_dump_json().encode()
    budget = max(MiB, puts * entry_cost("cache:brick:20261206-000000:" + "0" * 64, len(data)) // 4)
    settings = Settings(redis_url=redis.url, redis_prefix="bench:", cache_max_bytes=budget)
    conn = RedisConnection(settings, breaker_s=0.0)
    cache = ResultCache(settings, conn, ServiceMetrics())
    keys = [cache.key(f"{i:064x}", "brick", "20261206-000000", 1.5, InspectOptions()) for i in range(puts)]

    async def budgeted(key: str) -> None:
        await cache.put_many([(key, entry, 3600.0)])

    async def plain(key: str) -> None:  # what put_many did before the budget: encode, SET
        value = entry.model_dump_json().encode()
        await conn.run("cache_put", lambda r: r.set(key, value, px=3_600_000))

    lines = []
    for n in range(rounds):
        for name, write, commands in (("plain SET (no budget)", plain, ("set",)),
                                      ("budgeted (PUT script)", budgeted, ("evalsha", "eval"))):
            redis.client().flushall()
            await budgeted(keys[0])  # the script loaded, the connections open
            cpu_us, redis_us, calls = await time_writes(redis, puts, write, keys, commands)
            lines.append(f"| {n + 1} | {name} | {cpu_us:.1f} µs | {redis_us:.1f} µs | {calls} |")
    evicted = cache.metrics.redis_evictions.labels("cache")._value.get()
    lines.append(f"\n(entry {len(data)} bytes; budget {budget / MiB:.2f} MiB; {evicted:.0f} evictions in all)")
    await conn.aclose()
    return lines


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp, RedisProc(Path(tmp)) as redis:
        print(f"# Redis byte budgets ({os.cpu_count()} cores; redis-server on loopback)\n")
        print(f"{args.links} heatmap links of {args.link_bytes} bytes (random, as incompressible as a PNG):\n")
        print("| budget | Redis used_memory growth |\n| --- | --- |")
        for mib in (*args.budgets_mib, 1024.0):
            grown = await flood_links(redis, int(mib * MiB), args.links, args.link_bytes)
            label = f"{mib:g} MiB" if mib < 1024 else "1 GiB (above the flood: what a TTL alone kept)"
            print(f"| {label} | {grown / 1e6:.2f} MB |")
        print(f"\nA cached `heatmap=none` result written {args.puts} times a round, 8 writers "
              "(this process's CPU per write; Redis's time per call, `INFO commandstats`):\n")
        print("| round | write | client CPU per write | Redis per call | calls |\n| --- | --- | --- | --- | --- |")
        for line in await cache_writes(redis, args.puts, args.rounds):
            print(line)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=int, default=400)
    parser.add_argument("--link-bytes", type=int, default=20_000)
    parser.add_argument("--budgets-mib", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--puts", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    started = time.monotonic()
    uvloop.run(main(parser.parse_args()))
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    cli()
