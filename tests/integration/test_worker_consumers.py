"""The job streams' consumer group stays bounded through worker restarts.

A worker's consumer name is host-pid by default, so every restart (every pod restart) added
a consumer to each category's group and nothing removed one: ``XINFO CONSUMERS`` grew for
the life of the service. Workers now delete the consumers with nothing pending that were not
seen for ``job_consumer_idle_s`` (service/redisq/consumers.py); a dead worker's jobs are
claimed first, so none is lost.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from redis import exceptions as redis_errors

from harness import CATEGORY, RedisServer, until
from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.consumers import IdleConsumers
from service.redisq.jobs import GROUP, JobQueue
from service.schemas import InspectOptions, Upload
from service.worker import Worker
from worker_fixtures import redis, settings_for, stop_running, store  # noqa: F401  (fixtures)

IDLE_S = 0.6


def consumers(r, stream: str) -> dict[str, int]:
    """Name -> pending entries of each consumer of the workers' group."""
    try:
        return {c["name"].decode(): int(c["pending"]) for c in r.xinfo_consumers(stream, GROUP)}
    except redis_errors.ResponseError:  # no stream or no group: no worker made it yet
        return {}


def test_restarted_workers_leave_no_consumer_behind_and_no_job_is_lost(
        redis: RedisServer, store: Path, good_images: list[Path]) -> None:  # noqa: F811
    settings = settings_for(store, redis, job_consumer_idle_s=IDLE_S, redis_prefix="msflow-consumers:")
    r = redis.client()
    r.flushall()
    api = JobQueue(settings, RedisConnection(settings))
    stream = api.stream(CATEGORY)

    async def scenario() -> None:
        seen: list[int] = []
        for i in range(6):  # six pod restarts, each a new host-pid name, each running a job
            await api.submit(CATEGORY, [Upload("a.png", good_images[i].read_bytes())], InspectOptions(), None)
            worker = Worker(settings, name=f"pod-{i}")
            loop = asyncio.create_task(worker.run())
            # Redis makes a consumer at its first delivery (7.0), or its first read (7.2)
            await until(lambda w=worker: w.name in consumers(r, stream), "the worker's consumer", timeout=30)
            await asyncio.sleep(IDLE_S)
            seen.append(len(consumers(r, stream)))
            await stop_running(worker, loop)
        # Each start removes the consumers of the workers stopped over IDLE_S before: two at most
        # (the one before it, and its own), where there were as many as restarts.
        assert max(seen) <= 2, seen

        # A worker killed holding a job: its consumer holds the job pending and is not deleted
        # for idleness; a live worker claims the job (its pending count goes to 0), runs it,
        # and then the dead consumer goes.
        job = (await api.submit(CATEGORY, [Upload("a.png", good_images[0].read_bytes())],
                                InspectOptions(), request_id=None)).id
        held = await api.read([CATEGORY], "pod-killed", 1, 1.0)
        assert [d.job_id for d in held] == [job]
        await asyncio.sleep(IDLE_S + 0.1)
        deleted = await api.consumers.prune([stream], keep="someone-else")
        assert "pod-killed" not in deleted[stream] and consumers(r, stream)["pod-killed"] == 1

        live = Worker(settings, name="live")
        loop = asyncio.create_task(live.run())
        try:
            await until(lambda: (rec := r.get(f"msflow-consumers:job:{job}")) and b'"done"' in rec,
                        "the dead worker's job done by the live one", timeout=30)
            await until(lambda: set(consumers(r, stream)) == {"live"}, "only the live worker's consumer left",
                        timeout=10)
        finally:
            await stop_running(live, loop, api.conn)

    asyncio.run(scenario())


def test_pruning_spares_the_caller_the_pending_and_the_recently_seen(redis: RedisServer) -> None:  # noqa: F811
    r = redis.client()
    stream = "msflow-prune-unit:jobs:brick"
    r.delete(stream)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for k in range(3):
        r.xadd(stream, {"job_id": f"j{k}", "category": "brick"})
    r.xreadgroup(GROUP, "holder", {stream: ">"}, count=1)  # holds one pending
    for name in ("dead-1", "dead-2", "me"):
        r.xreadgroup(GROUP, name, {stream: "0"}, count=1)  # their own history: nothing pending

    async def scenario() -> None:
        conn = RedisConnection(Settings(redis_url=redis.url), breaker_s=0.0)
        prune = IdleConsumers(conn, GROUP, idle_s=0.3)
        try:
            assert await prune.prune([stream, "msflow-prune-unit:jobs:none"], keep="me") == {
                stream: [], "msflow-prune-unit:jobs:none": []}  # none idle long enough; no stream: none
            await asyncio.sleep(0.35)
            r.xreadgroup(GROUP, "dead-2", {stream: "0"}, count=1)  # seen again just now
            deleted = await prune.prune([stream], keep="me")
            assert deleted == {stream: ["dead-1"]}
            assert consumers(r, stream) == {"holder": 1, "dead-2": 0, "me": 0}
        finally:
            await conn.aclose()

    asyncio.run(scenario())
