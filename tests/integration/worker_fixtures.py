"""Fixtures and helpers of the in-process worker tests (``test_worker_inprocess``,
``test_worker_inputs``, ``test_worker_faults``): a module-scoped private redis-server, a
private copy of the model store, the worker's settings, and :class:`Harness` (a started
:class:`~service.worker.Worker` plus the API side of the queue). Test modules import this,
never each other.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import CATEGORY, RedisServer
from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.jobs import JobQueue
from service.redisq.tasks import cancel_and_wait
from service.redisq.records import JobRecord
from service.schemas import InspectOptions, Upload
from service.worker import Worker

PREFIX = "msflow-inproc:"  # not the prefix of the other integration tests' workers
CLAIM_IDLE_S = 0.3


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-inproc"))
    yield server
    server.stop()


@pytest.fixture()
def store(model_store: Path, tmp_path: Path) -> Path:
    """A private copy: a threshold override writes its file beside the manifest."""
    dest = tmp_path / "store"
    shutil.copytree(model_store, dest)
    return dest


def settings_for(store: Path, redis: RedisServer, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(model_store=store, redis_url=redis.url, redis_prefix=PREFIX, device="cpu",
                                intra_op_threads=1, decode_threads=2, store_poll_s=0, max_batch_size=4,
                                max_queue_delay_ms=200, job_claim_idle_s=CLAIM_IDLE_S, job_max_attempts=2,
                                worker_block_s=0.2)
    return Settings(**{**base, **overrides})


class Harness:
    """A worker (started: models loaded, groups joined) and the API side of the queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker = Worker(settings, name="inproc")
        self.api = RedisConnection(settings)
        self.queue = JobQueue(settings, self.api)

    async def submit(self, uploads: list[Upload], options: InspectOptions = InspectOptions()) -> str:
        return (await self.queue.submit(CATEGORY, uploads, options, request_id=None)).id

    async def step(self, claim: bool = False) -> int:
        """One processing step of the worker on what it reads (or claims); how many deliveries."""
        if claim:
            deliveries = await self.worker.queue.claim(CATEGORY, self.worker.name, 8)
        else:
            deliveries = await self.worker.queue.read([CATEGORY], self.worker.name, 8, 1.0)
        await self.worker.runner.process(CATEGORY, deliveries)
        return len(deliveries)

    async def computed(self, deliveries: list[Any]) -> list[Any]:
        """The deliveries' jobs taken, fetched and run, their outcomes not recorded yet."""
        runner = self.worker.runner
        jobs = await runner._fetch(CATEGORY, await runner._take(CATEGORY, deliveries))
        with self.worker.runtime.pin(CATEGORY) as lane:
            await asyncio.gather(*(runner._run_job(lane, job) for job in jobs))
        return jobs

    async def record(self, job_id: str) -> JobRecord:
        record = await self.queue.records.get(job_id)
        assert record is not None
        return record

    def count(self, outcome: str) -> float:
        value = self.worker.metrics.registry.get_sample_value(
            "msflow_jobs_total", {"category": CATEGORY, "outcome": outcome})
        return value or 0.0


def run(settings: Settings, body: Any) -> Any:
    async def main() -> Any:
        h = Harness(settings)
        await h.worker.start()
        try:
            return await body(h)
        finally:
            await h.worker.close()
            await h.api.aclose()

    return asyncio.run(main())


def slow_run(seconds: float) -> Any:
    def make(real_run: Any) -> Any:
        def run_batch(batch: Any) -> Any:
            time.sleep(seconds)
            return real_run(batch)
        return run_batch
    return make


async def pending_of(conn: RedisConnection, queue: JobQueue) -> list[dict[str, Any]]:
    """The category's pending jobs (XPENDING of the workers' group): who holds each, how often delivered."""
    return await conn.client.xpending_range(queue.stream(CATEGORY), "workers", min="-", max="+", count=10)


async def bounded(awaitable: Awaitable[Any], timeout_s: float, what: str) -> Any:
    """``await awaitable`` as a task, waited for without relying on its cancellation: one that
    does not end in ``timeout_s`` fails the test, naming ``what`` and where it waits (a lost
    cancellation made ``wait_for`` itself wait forever: service/redisq/tasks.py)."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=timeout_s)
    if not done:
        where = io.StringIO()
        task.print_stack(file=where)
        await cancel_and_wait([task])
        raise AssertionError(f"{what} did not end within {timeout_s} s; it waited at:\n{where.getvalue()}")
    return task.result()


async def stop_running(worker: Worker, loop: asyncio.Task[Any], *conns: RedisConnection) -> None:
    """Stop a worker whose ``run()`` is ``loop``, and close it and ``conns``; each step bounded."""
    worker.stop.set()
    await bounded(loop, 30, "the worker's loop, once stopped,")
    await bounded(worker.close(), 60, "Worker.close()")
    for conn in conns:
        await bounded(conn.aclose(), 10, "closing a Redis connection")
