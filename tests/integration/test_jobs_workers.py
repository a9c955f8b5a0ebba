"""Whether any worker consumes a job's category, from the workers' heartbeats in Redis.

Before, a job with no ``msflow worker`` alive said ``queued`` until it expired a day later,
exactly as one in a long queue; now its 202 and its GET count the workers alive (0: none).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from harness import CATEGORY, RedisServer, WorkerProc, client_for, png_variant, start, upload, wait_until
from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.workers import MISSED_BEATS, WorkerHeartbeats

PREFIX = "msflow-heartbeats:"


def test_heartbeats_count_live_workers_and_drop_a_dead_one(private_redis: RedisServer) -> None:
    every = 0.1
    r = private_redis.client()

    async def scenario() -> None:
        s = Settings(redis_url=private_redis.url, redis_prefix=PREFIX)
        conn = RedisConnection(s, breaker_s=0.0)
        beats = WorkerHeartbeats(conn, every_s=every)
        try:
            assert await beats.alive("brick") == 0
            await beats.beat("w1", ["brick", "grass"])
            await beats.beat("w2", ["brick"])
            assert (await beats.alive("brick"), await beats.alive("grass"), await beats.alive("gravel")) == (2, 1, 0)
            await beats.leave("w2", ["brick"])  # a clean stop leaves at once
            assert await beats.alive("brick") == 1
            await asyncio.sleep(every * MISSED_BEATS + 0.1)  # w1 killed: its beats stopped
            assert await beats.alive("brick") == 0
            assert r.exists(f"{PREFIX}workers:brick", f"{PREFIX}workers:grass") == 0  # nothing left behind
        finally:
            await conn.aclose()

    asyncio.run(scenario())


def test_a_queued_job_says_whether_a_worker_consumes_it(redis_store: Path, redis_server: RedisServer,
                                                       good_images: list[Path], tmp_path: Path) -> None:
    common = dict(redis_url=redis_server.url, redis_prefix=PREFIX)
    server = start(redis_store, tmp_path / "api.log", **common)
    worker: WorkerProc | None = None
    try:
        with client_for(server) as api:
            def submit(nonce: str) -> dict[str, object]:
                r = api.post(f"/v1/jobs/{CATEGORY}", params={"heatmap": "none"},
                             files=[upload("a.png", png_variant(good_images[0], nonce))])
                assert r.status_code == 202, r.text
                return r.json()

            def status(job_id: str) -> dict[str, object]:
                r = api.get(f"/v1/jobs/{job_id}")
                assert r.status_code == 200, r.text
                return r.json()

            waiting = submit(f"none-{time.monotonic_ns()}")
            assert waiting["workers"] == 0  # no worker: said at once, and on every poll
            assert status(str(waiting["id"]))["workers"] == 0 and status(str(waiting["id"]))["status"] == "queued"

            worker = WorkerProc(redis_store, tmp_path / "w1.log", "w1", worker_block_s=0.5, **common)
            worker.wait_ready()
            done = wait_until(lambda: (lambda s: s if s["status"] == "done" else None)(status(str(waiting["id"]))),
                              60, "the waiting job to be done")
            assert done["workers"] is None  # finished: no longer a question
            assert submit(f"one-{time.monotonic_ns()}")["workers"] == 1

            worker.stop()  # SIGTERM: the worker leaves at once, not once its beat runs out
            worker = None
            assert submit(f"gone-{time.monotonic_ns()}")["workers"] == 0
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
