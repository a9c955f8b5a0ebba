"""A job that kills its worker costs only itself: real ``msflow worker`` processes on a real
redis-server, a poison job read together with five innocent ones, and every worker SIGKILLed
(as the kernel's OOM killer would) the moment it runs the poison job.

Before: the five innocents were re-claimed with the poison job, died with it three times,
and went to the dead-letter stream as ``worker_lost``. Now a re-delivered job is claimed on
its own and run alone, so the innocents finish at their second delivery and only the poison
job is dead-lettered. Also: a job over the per-request pixel budget fails at once, for good.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from harness import CATEGORY, RedisServer, WorkerProc, png_of, png_variant, wait_until
from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.jobs import GROUP, JobQueue
from service.schemas import HeatmapMode, HeatmapSize, InspectOptions, Upload

PREFIX = "msflow-isolation:"
MAX_ATTEMPTS = 3


def _submit(redis_server: RedisServer, jobs: list[tuple[list[Upload], InspectOptions]]) -> list[str]:
    async def main() -> list[str]:
        s = Settings(redis_url=redis_server.url, redis_prefix=PREFIX, model_store=Path("."))
        conn = RedisConnection(s, breaker_s=0.0)
        queue = JobQueue(s, conn)
        try:
            return [(await queue.submit(CATEGORY, uploads, options, None)).id for uploads, options in jobs]
        finally:
            await conn.aclose()
    return asyncio.run(main())


class _OomKiller(threading.Thread):
    """SIGKILLs whichever worker marks ``job_id`` running, each time one does."""

    def __init__(self, redis_server: RedisServer, job_id: str, workers: dict[str, WorkerProc]) -> None:
        super().__init__(daemon=True)
        self.r, self.key, self.workers = redis_server.client(), f"{PREFIX}job:{job_id}", workers
        self.killed: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            raw = self.r.get(self.key)
            record = json.loads(raw) if raw else {}
            worker = self.workers.get(record.get("worker", ""))
            if record.get("status") == "running" and worker is not None and worker.proc.poll() is None:
                os.kill(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait(10)
                self.killed.append(worker.name)
            time.sleep(0.002)


@pytest.fixture
def workers() -> Iterator[dict[str, WorkerProc]]:
    procs: dict[str, WorkerProc] = {}
    yield procs
    for p in procs.values():
        p.stop()


def test_a_job_that_kills_its_workers_is_dead_lettered_alone(redis_store: Path, redis_server: RedisServer,
                                                             good_images: list[Path], workers: dict[str, WorkerProc],
                                                             tmp_path: Path) -> None:
    big = Image.open(good_images[5]).convert("RGB").resize((900, 900))
    slow = InspectOptions(heatmap=HeatmapMode.inline, heatmap_size=HeatmapSize.original, overlay=True)
    poison = ([Upload(filename=f"poison-{k}.png", data=png_of(big.rotate(90 * k))) for k in range(6)], slow)
    innocents = [([Upload(filename=f"ok-{i}.png", data=png_variant(good_images[i], f"iso{i}"))],
                  InspectOptions(heatmap=HeatmapMode.none)) for i in range(5)]
    # Queued before any worker runs: the first worker reads all six in one XREADGROUP.
    poison_id, *innocent_ids = _submit(redis_server, [poison, *innocents])
    killer = _OomKiller(redis_server, poison_id, workers)
    killer.start()
    r = redis_server.client()
    try:
        for n in range(MAX_ATTEMPTS + 1):
            name = f"iso{n}"
            workers[name] = WorkerProc(redis_store, tmp_path / f"{name}.log", name, redis_url=redis_server.url,
                                       redis_prefix=PREFIX, job_claim_idle_s=1.0, job_max_attempts=MAX_ATTEMPTS,
                                       worker_block_s=0.5, max_batch_size=8)
            if n < MAX_ATTEMPTS:  # each of these dies running the poison job (the last one buries it)
                wait_until(lambda: workers[name].proc.poll() is not None, 60, f"worker {name} to be killed")
            else:
                workers[name].wait_ready()
        records = {}
        for job_id in [poison_id, *innocent_ids]:
            records[job_id] = wait_until(
                lambda j=job_id: (lambda raw: json.loads(raw) if raw and json.loads(raw)["status"] in {"done", "failed"}
                                  else None)(r.get(f"{PREFIX}job:{j}")), 60, f"job {job_id} to end")
    finally:
        killer.done.set()
    assert killer.killed == [f"iso{n}" for n in range(MAX_ATTEMPTS)]
    dead = records[poison_id]
    assert dead["status"] == "failed" and dead["error"]["code"] == "worker_lost", dead
    for job_id in innocent_ids:
        assert records[job_id]["status"] == "done", records[job_id]
        assert records[job_id]["attempts"] <= 2  # delivered with the poison once, then alone
    letters = [f for _, f in r.xrange(f"{PREFIX}jobs:dead-letter")]
    assert [f[b"job_id"].decode() for f in letters] == [poison_id]
    assert r.xpending(f"{PREFIX}jobs:{CATEGORY}", GROUP)["pending"] == 0


def test_a_job_over_the_pixel_budget_fails_at_once(redis_store: Path, redis_server: RedisServer,
                                                   workers: dict[str, WorkerProc], tmp_path: Path) -> None:
    """Priced from its headers by the worker (a client that bypassed the API's check): 4 x 4 MP
    over a 10 MP budget. Not retried: the same bytes cost the same next time."""
    grey = png_of(Image.new("L", (2000, 2000), 100))
    (job_id,) = _submit(redis_server, [([Upload(filename=f"g{i}.png", data=grey) for i in range(4)],
                                        InspectOptions(heatmap=HeatmapMode.none))])
    workers["px"] = WorkerProc(redis_store, tmp_path / "px.log", "px", redis_url=redis_server.url,
                               redis_prefix=PREFIX, job_claim_idle_s=1.0, worker_block_s=0.5,
                               max_request_megapixels=10, max_inflight_megapixels=20)
    workers["px"].wait_ready()
    r = redis_server.client()
    record = wait_until(lambda: (lambda raw: json.loads(raw) if raw and json.loads(raw)["status"] == "failed" else None)(
        r.get(f"{PREFIX}job:{job_id}")), 30, "the job to fail")
    assert record["error"]["code"] == "too_many_pixels" and record["attempts"] == 1, record
    assert "megapixels" in record["error"]["message"]
