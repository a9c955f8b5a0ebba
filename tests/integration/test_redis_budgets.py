"""Byte budgets of what Redis keeps on a TTL (heatmap links, cached results, finished job
records) against a real redis-server: a TTL alone let them grow with the write rate until a
``noeviction`` Redis refused every write, job submissions and thresholds included."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import redis

from harness import RedisServer
from service.config import Settings
from service.metrics import ServiceMetrics
from service.redisq.budget import entry_cost, maxmemory_warning
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.redisq.jobs import JobQueue
from service.redisq.store import CachedResult, HeatmapLinks, ResultCache
from service.schemas import ImageResult, InspectOptions, InspectResponse, Upload

PREFIX = "msflow-budgets:"
PNG_BYTES = 20_000


def _settings(private_redis: RedisServer, **settings: object) -> Settings:
    # Small heatmaps, so that link budgets of a few links are valid settings.
    settings.setdefault("max_heatmap_pixels", 4096)
    return Settings(redis_url=private_redis.url, redis_prefix=PREFIX, redis_socket_timeout_s=1.0, **settings)


def _charged(r: redis.Redis, name: str) -> dict[str, int]:
    sizes = {k.decode(): int(v) for k, v in r.hgetall(f"{PREFIX}budget:{name}:bytes").items()}
    total = sizes.pop("#total", 0)
    assert total == sum(sizes.values()), "the total is the sum of what the index holds"
    assert r.zcard(f"{PREFIX}budget:{name}:expiry") == len(sizes)
    return sizes


def _counted(metrics: ServiceMetrics, store: str) -> float:
    return metrics.redis_evictions.labels(store)._value.get()


def test_links_past_the_budget_evict_the_oldest_and_redis_stays_within_it(private_redis: RedisServer) -> None:
    r = private_redis.client()
    cost = entry_cost("heatmap:" + "x" * 32, PNG_BYTES)
    settings = _settings(private_redis, heatmap_max_bytes=5 * cost + cost // 2, heatmap_ttl_s=60)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        conn = RedisConnection(settings, breaker_s=0.0)
        links = HeatmapLinks(settings, conn, memory=False, metrics=metrics)  # Redis only, as a worker's
        made = []
        for i in range(12):
            link, durable = await links.put(os.urandom(PNG_BYTES), 64, 64)
            assert durable
            made.append(link.url.rsplit("/", 1)[1].removesuffix(".png"))
        kept = [await links.get(link_id) is not None for link_id in made]
        assert kept == [False] * 7 + [True] * 5, (kept, _charged(r, "links"))
        assert len(_charged(r, "links")) == 5 and _counted(metrics, "links") == 7
        assert len(r.keys(f"{PREFIX}heatmap:*")) == 5
        await conn.aclose()

    asyncio.run(scenario())


def test_a_flood_of_links_holds_redis_memory_flat(private_redis: RedisServer) -> None:
    """What the budget is for, measured as Redis sees it: 400 links of 20 KB (8 MB) into a
    1 MiB budget leave Redis's memory where 1 MiB of links leaves it."""
    r = private_redis.client()
    settings = _settings(private_redis, heatmap_max_bytes=1024 * 1024, heatmap_ttl_s=600)

    async def put(conn: RedisConnection, n: int) -> None:
        links = HeatmapLinks(settings, conn, memory=False)
        for _ in range(n):
            await links.put(os.urandom(PNG_BYTES), 64, 64)

    async def scenario() -> None:
        conn = RedisConnection(settings, breaker_s=0.0)
        base = r.info("memory")["used_memory"]
        await put(conn, 50)  # fills the budget
        full = r.info("memory")["used_memory"]
        await put(conn, 350)
        after = r.info("memory")["used_memory"]
        await conn.aclose()
        assert full - base > 800_000, "the budget's worth of links is in Redis"
        assert after - base < 1.15 * (full - base), (base, full, after)
        assert sum(_charged(r, "links").values()) <= 1024 * 1024

    asyncio.run(scenario())


def _result(heatmap_bytes: int) -> CachedResult:
    result = ImageResult(index=0, filename="a.png", score=0.2, raw_score=1.0, threshold=1.5, is_anomalous=False,
                         verdict="ok", ng_threshold=2.5, model_version="1", batch_size=1,
                         heatmap={"format": "png", "encoding": "base64", "data": "A" * heatmap_bytes,
                                  "width": 8, "height": 8},
                         timings_ms={"decode": 1, "queue": 1, "engine": 1, "render": 1, "total": 4},
                         image_size={"width": 8, "height": 8}, regions=[])
    return CachedResult(engine="onnxruntime-cpu", result=result)


def test_cache_entries_past_the_budget_evict_the_soonest_expiring(private_redis: RedisServer) -> None:
    r = private_redis.client()
    entry = _result(10_000)
    one = entry_cost("cache:brick:1:" + "0" * 64, len(entry.model_dump_json()))
    settings = _settings(private_redis, cache_max_bytes=4 * one + one // 2, cache_ttl_s=60)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        conn = RedisConnection(settings, breaker_s=0.0)
        cache = ResultCache(settings, conn, metrics)
        keys = [cache.key(f"{i:064x}", "brick", "1", 1.5, InspectOptions()) for i in range(7)]
        await cache.put_many([(keys[0], entry, 30.0)])  # the shortest TTL: evicted first
        await cache.put_many([(k, entry, 60.0) for k in keys[1:4]])  # one request, three images
        await cache.put_many([(keys[1], entry, 60.0)])  # written again: charged once
        assert len(_charged(r, "cache")) == 4 and _counted(metrics, "cache") == 0
        await cache.put_many([(k, entry, 60.0) for k in keys[4:6]])
        found = await cache.get_many(keys[:6])
        # keys[0] had the shortest TTL; keys[1]'s second write gave it a new one, so keys[2] went next
        assert [f is not None for f in found] == [False, True, False, True, True, True]
        assert _counted(metrics, "cache") == 2 and len(_charged(r, "cache")) == 4
        # an entry larger than the whole budget is not written (and evicts nothing)
        await cache.put_many([(keys[6], _result(5 * one), 60.0)])
        assert (await cache.get_many([keys[6]]))[0] is None and len(_charged(r, "cache")) == 4
        await conn.aclose()

    asyncio.run(scenario())


def test_a_cache_key_holding_more_than_any_entry_is_not_read_whole(private_redis: RedisServer) -> None:
    """The cache's lookup read its keys whole (MGET): a key of 64 MB (another writer's, or
    garbage) crossed the wire into the process on every request for that image. Now at most one
    byte past the largest entry this server writes is read, and it is a miss; a key of another
    type is a miss too, and neither fails the lookup of the request's other images."""
    r = private_redis.client()
    entry = _result(1_000)
    settings = _settings(private_redis, cache_max_entry_bytes=64 * 1024)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        conn = RedisConnection(settings, breaker_s=0.0)
        cache = ResultCache(settings, conn, metrics)
        good, big, other_type, exact = (cache.key(f"{i:064x}", "brick", "1", 1.5, InspectOptions()) for i in range(4))
        await cache.put_many([(good, entry, 60.0)])
        r.set(big, b"{" + b" " * (64 << 20))
        r.hset(other_type, "a", "b")
        r.set(exact, entry.model_dump_json().encode().ljust(64 * 1024))
        sent_before = int(r.info("stats")["total_net_output_bytes"])
        found = await cache.get_many([good, big, other_type, exact])
        sent = int(r.info("stats")["total_net_output_bytes"]) - sent_before
        assert sent < 1 << 20, f"{sent} bytes read for one lookup"
        assert found[0] == entry and found[1] is None and found[2] is None
        assert found[3] == entry  # an entry as large as the setting allows is read whole
        assert not conn.skipping
        await conn.aclose()

    asyncio.run(scenario())


def test_entries_that_expired_leave_the_budget(private_redis: RedisServer) -> None:
    r = private_redis.client()
    settings = _settings(private_redis, heatmap_max_bytes=10 * 1024 * 1024, heatmap_ttl_s=0.3)

    async def scenario() -> None:
        conn = RedisConnection(settings, breaker_s=0.0)
        links = HeatmapLinks(settings, conn, memory=False)
        for _ in range(5):
            await links.put(os.urandom(PNG_BYTES), 64, 64)
        assert len(_charged(r, "links")) == 5
        await asyncio.sleep(0.4)
        await links.put(os.urandom(PNG_BYTES), 64, 64)  # a write sweeps what expired
        assert len(_charged(r, "links")) == 1
        await conn.aclose()

    asyncio.run(scenario())


UPLOADS = [Upload(filename="a.png", data=b"\x89PNG" + b"x" * 1000)]


def _done(record: object, answer_bytes: int) -> object:
    entry = _result(answer_bytes)
    response = InspectResponse(request_id="r", category="brick", model_version="1", engine="onnxruntime-cpu",
                               results=[entry.result])
    return record.model_copy(update={"status": "done", "attempts": 1, "worker": "w1",  # type: ignore[attr-defined]
                                     "result": response})


def test_finished_job_records_past_the_budget_evict_the_oldest_finished(private_redis: RedisServer) -> None:
    """Unfinished jobs are never evicted (their inputs have a budget of their own), and a
    repeated final write neither charges twice nor evicts."""
    r = private_redis.client()
    record_bytes = 30_000

    async def scenario() -> None:
        probe = JobQueue(_settings(private_redis), RedisConnection(_settings(private_redis), breaker_s=0.0))
        sample = await probe.submit("gravel", UPLOADS, InspectOptions(), None)
        one = entry_cost(f"job:{sample.id}", len(_done(sample, record_bytes).model_dump_json()))  # type: ignore[attr-defined]
        await probe.conn.aclose()

        settings = _settings(private_redis, job_max_results_bytes=3 * one + one // 2)
        queue = JobQueue(settings, RedisConnection(settings, breaker_s=0.0))
        await queue.ensure_groups(["brick"])
        jobs = [await queue.submit("brick", UPLOADS, InspectOptions(), None) for _ in range(6)]
        deliveries = {d.job_id: d for d in await queue.read(["brick"], "w1", 10, 0.5)}
        writes = [await queue.complete(deliveries[j.id], _done(j, record_bytes)) for j in jobs[:5]]  # type: ignore[arg-type]
        assert [(w.written, w.evicted) for w in writes] == [(True, 0)] * 3 + [(True, 1)] * 2
        again = await queue.complete(deliveries[jobs[4].id], _done(jobs[4], record_bytes))  # type: ignore[arg-type]
        assert (again.written, again.evicted) == (False, 0)
        states = [await queue.records.get(j.id) for j in jobs]
        assert [s.status if s else None for s in states] == [None, None, "done", "done", "done", "queued"]
        assert len(_charged(r, "job-results:brick")) == 3
        assert r.exists(f"{PREFIX}jobs-inputs:gravel:bytes"), "another category's jobs are untouched"
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_an_expired_record_resubmitted_under_its_key_is_not_evicted_for_it(private_redis: RedisServer) -> None:
    """The index may still name a finished record that expired by its TTL (a write sweeps 32
    such names at a time); a job submitted again under the same idempotency key has that
    name, and an eviction must not delete the new job's record."""
    r = private_redis.client()
    expiry, sizes = f"{PREFIX}budget:job-results:brick:expiry", f"{PREFIX}budget:job-results:brick:bytes"

    async def scenario() -> None:
        settings = _settings(private_redis, job_max_results_bytes=60_000)
        queue = JobQueue(settings, RedisConnection(settings, breaker_s=0.0))
        await queue.ensure_groups(["brick"])
        again = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="part-1")
        other = await queue.submit("brick", UPLOADS, InspectOptions(), None)
        # As the index stands after part-1's first job finished and expired unswept, behind
        # more expired names than one write sweeps.
        past = int(time.time() * 1000) - 100_000
        r.zadd(expiry, {f"job:expired-{i}": past - 1000 + i for i in range(32)} | {f"job:{again.id}": past})
        r.hset(sizes, mapping={f"job:expired-{i}": 1 for i in range(32)} | {f"job:{again.id}": 58_000})
        r.hset(sizes, "#total", 58_032)
        delivery = next(d for d in await queue.read(["brick"], "w1", 10, 0.5) if d.job_id == other.id)
        assert (await queue.complete(delivery, _done(other, 5000))).evicted == 0  # type: ignore[arg-type]
        resubmitted = await queue.records.get(again.id)
        assert resubmitted is not None and resubmitted.status == "queued"
        assert set(_charged(r, "job-results:brick")) == {f"job:{other.id}"}
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_budgets_past_maxmemory_are_reported_at_start(private_redis: RedisServer) -> None:
    r = private_redis.client()
    settings = _settings(private_redis)  # defaults: (512 + 256) MiB a category + 256 + 256 MiB

    async def warning(categories: int, s: Settings = settings) -> str | None:
        conn = RedisConnection(s, breaker_s=0.0)
        try:
            return await maxmemory_warning(conn, s, categories)
        finally:
            await conn.aclose()

    assert asyncio.run(warning(3)) is None, "no maxmemory: nothing to compare"
    r.config_set("maxmemory", str(2 * 1024**3))
    assert asyncio.run(warning(1)) is None  # 1,280 MiB
    text = asyncio.run(warning(3))  # 2,816 MiB
    assert text is not None and "maxmemory is 2048 MiB" in text and "2816 MiB for 3 categories" in text
    assert asyncio.run(warning(3, _settings(private_redis, job_max_backlog_bytes=128 * 1024**2))) is None
    r.config_set("maxmemory", "0")
    gone = Settings(redis_url="redis://127.0.0.1:1/0", redis_socket_timeout_s=0.2, redis_connect_timeout_s=0.2)
    assert asyncio.run(warning(3, gone)) is None, "Redis unreachable: the check is skipped, start-up goes on"


def test_a_job_is_refused_while_redis_is_past_maxmemory(private_redis: RedisServer) -> None:
    """Compose runs Redis with ``maxmemory`` and ``noeviction``: past the limit a submission must
    be refused (503 redis_unavailable), not stored. The submission's script wrote first with
    XTRIM, which Redis lets through at the limit, and a script that has written is let finish:
    every submission went on past maxmemory (150 of 150 accepted, Redis 2.4 MB over it)."""
    r = private_redis.client()
    r.set(f"{PREFIX}ballast", b"x" * 3_000_000)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(1024 * 1024))  # below what it holds: it refuses what adds

    async def scenario() -> None:
        settings = _settings(private_redis)
        queue = JobQueue(settings, RedisConnection(settings, breaker_s=0.0))
        try:
            with pytest.raises(redis.exceptions.ResponseError, match="maxmemory"):
                r.set(f"{PREFIX}another", b"x")
            with pytest.raises(RedisUnavailable, match="maxmemory"):
                await queue.submit("brick", UPLOADS, InspectOptions(), None)
            assert not r.keys(f"{PREFIX}job:*") and not r.exists(f"{PREFIX}jobs:brick")
        finally:
            await queue.conn.aclose()
            r.config_set("maxmemory", "0")
            r.delete(f"{PREFIX}ballast")

    asyncio.run(scenario())
