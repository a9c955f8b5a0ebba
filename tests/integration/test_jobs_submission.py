"""Job submission against a real redis-server (``JobQueue.submit``, no model needed): what a
refused or resubmitted job costs Redis, and whether a submission says it queued anything.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness import RedisServer
from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.jobs import BacklogFull, JobQueue
from service.schemas import InspectOptions, Upload

CATEGORY = "brick"
MiB = 1024 * 1024


def _received(r: Any) -> int:
    return int(r.info("stats")["total_net_input_bytes"])


def _queue(redis: RedisServer, **overrides: Any) -> tuple[JobQueue, RedisConnection]:
    conn = RedisConnection(Settings(redis_url=redis.url, redis_prefix="msflow-submit:", **overrides), breaker_s=0.0)
    return JobQueue(conn.settings, conn), conn


@pytest.mark.parametrize("full", ["count", "bytes"])
def test_a_submission_refused_for_a_full_backlog_does_not_ship_its_images(private_redis: RedisServer,
                                                                          full: str) -> None:
    """Before, the images went to Redis with the script that found no room: each refused
    request shipped up to 64 MiB and held it in Redis's query buffer, outside every budget."""
    r = private_redis.client()
    limits = {"job_max_backlog": 1} if full == "count" else {"job_max_backlog_bytes": 2 * MiB}
    big = [Upload("big.png", b"\x89PNG" + bytes(4 * MiB))]

    async def scenario() -> None:
        queue, conn = _queue(private_redis, **limits)
        try:
            if full == "count":
                await queue.submit(CATEGORY, [Upload("a.png", b"small")], InspectOptions(), None)
            before = _received(r)
            for _ in range(3):
                with pytest.raises(BacklogFull):
                    await queue.submit(CATEGORY, big, InspectOptions(), None)
            assert _received(r) - before < 64 * 1024  # the checks' arguments, not 3 x 4 MiB
        finally:
            await conn.aclose()

    asyncio.run(scenario())


def test_a_resubmitted_idempotency_key_queues_nothing_and_ships_nothing(private_redis: RedisServer) -> None:
    """The API counted msflow_jobs_total{outcome="queued"} on every 202, a resubmission that
    queued nothing included: enqueue says whether it queued (and a resubmission no longer
    sends its images again)."""
    r = private_redis.client()
    images = [Upload("a.png", b"\x89PNG" + bytes(MiB))]

    async def scenario() -> None:
        queue, conn = _queue(private_redis)
        try:
            first = await queue.enqueue(CATEGORY, images, InspectOptions(), None, idempotency_key="k-1")
            before = _received(r)
            again = await queue.enqueue(CATEGORY, images, InspectOptions(), None, idempotency_key="k-1")
            assert _received(r) - before < 64 * 1024
            assert (first.queued, again.queued) == (True, False) and first.record.id == again.record.id
        finally:
            await conn.aclose()

    asyncio.run(scenario())
    assert r.xlen("msflow-submit:jobs:brick") == 1
