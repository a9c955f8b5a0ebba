"""A worker whose every category the store watch retired (a one-category line whose only
version is being replaced for longer than the grace: its folder is there, with no complete
version), against a real redis-server and the worker's own loop.

Before: it asked Redis to read no stream at all; redis-py refused (``DataError``: XREADGROUP
streams must be a non empty dict), which the worker took for Redis being down: a warning
"Redis unavailable" every second, ``msflow_redis_errors_total{operation="xreadgroup"}`` counting
up, for as long as nothing served. Now it waits for the store, asking Redis only whether it
answers (an outage meanwhile still holds its claims off, as e86b138 made it), and consumes the
category again once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from harness import CATEGORY, RedisServer, fake_version, png_of, until
from service.redisq.connection import RedisConnection
from service.redisq.jobs import JobQueue
from service.schemas import HeatmapMode, InspectOptions, Upload
from service.worker import Worker
from worker_fixtures import settings_for, stop_running

IMAGE = png_of(Image.new("RGB", (32, 32), (90, 60, 40)))


def _redis_errors(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("msflow_redis_errors_total", {"operation": "xreadgroup"}) or 0.0


def test_a_worker_with_every_category_retired_waits_quietly_and_takes_one_up_when_it_is_back(
        tmp_path: Path, private_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY)
    settings = settings_for(store, private_redis, engine="null", store_removal_grace_s=0)

    async def main() -> None:
        api_conn = RedisConnection(settings, breaker_s=0.0)
        api = JobQueue(settings, api_conn)
        worker = Worker(settings, name="alone")
        loop = asyncio.create_task(worker.run())
        try:
            await until(lambda: worker.categories or loop.done(), "the worker to start", 30)
            shutil.rmtree(store / CATEGORY / "1")  # the folder stays, with no complete version
            await worker.runtime.registry.refresh()  # the worker's store watch (grace 0)
            await until(lambda: not worker.categories or loop.done(), "the category to be let go of", 5)
            caplog.clear()
            await asyncio.sleep(10 * settings.worker_block_s + 1.5)
            assert _redis_errors(worker) == 0
            assert not worker.redis_failed
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Redis" in r.getMessage()]

            # An outage while nothing is consumed is still seen (no claim right after it).
            await asyncio.to_thread(private_redis.stop)
            await until(lambda: worker.redis_failed or loop.done(), "the worker to see Redis gone", 10)
            await asyncio.to_thread(private_redis.start)

            fake_version(store, CATEGORY, "2")  # back
            await worker.runtime.registry.refresh()
            job = (await api.submit(CATEGORY, [Upload("a.png", IMAGE)], InspectOptions(heatmap=HeatmapMode.none),
                                    None)).id

            async def done() -> bool:
                record = await api.records.get(job)
                return record is not None and not isinstance(record, str) and record.status == "done"

            for _ in range(200):
                if await done() or loop.done():
                    break
                await asyncio.sleep(0.05)
            assert await done() and worker.categories == [CATEGORY]
            assert not loop.done()
        finally:
            await stop_running(worker, loop, api_conn)

    with caplog.at_level(logging.WARNING, logger="service.worker"):
        asyncio.run(main())
