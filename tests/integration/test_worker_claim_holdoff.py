"""When a worker may claim other workers' pending jobs, against a real redis-server and the
real worker loop (the null engine, on a store of hand-written manifests: no model to load, so
a worker starts within a second of being asked to):

* A worker started just after a Redis outage it never saw. During the outage every holder's
  keep-alive failed, so its live jobs' idle time grew past ``job_claim_idle_s``. Before: the
  new worker claimed such a job at its first loop (delivery 2, charged to the job) and ran it
  again beside its live holder. Now no worker claims before Redis has answered it for the
  claim hold-off (``service/worker/claim_holdoff.py``: a keep-alive period plus a timed-out
  call, at most one claim idle period, which it is at these tests' short idle times), at
  start as after an outage it saw.
* A dead worker's job is still claimed by a worker started after its death, once that worker
  has had Redis for the hold-off.
* A dead worker's job is claimed though Redis fails this worker more often than the claim
  idle time (a slow command now and then). Before: every failed call restarted a hold-off of
  job_claim_idle_s, so the job was never claimed and waited out its TTL.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from PIL import Image

from harness import CATEGORY, RedisServer, fake_version, png_of, until
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.redisq.jobs import JobQueue
from service.schemas import HeatmapMode, InspectOptions, Upload
from service.worker import Worker
from worker_fixtures import pending_of, settings_for, stop_running

NO_HEATMAP = InspectOptions(heatmap=HeatmapMode.none)
IMAGE = png_of(Image.new("RGB", (32, 32), (90, 60, 40)))


def _done(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("msflow_jobs_total",
                                                    {"category": CATEGORY, "outcome": "done"}) or 0.0


async def _keep_alive_once_redis_answers(holder: JobQueue, stream_id: str) -> None:
    while True:
        try:
            await holder.keep_alive(CATEGORY, "holder", [stream_id])
            return
        except RedisUnavailable:
            await asyncio.sleep(0.1)


def test_a_worker_started_just_after_an_outage_it_never_saw_does_not_claim_a_live_workers_job(
        tmp_path: Path, private_redis: RedisServer) -> None:
    """A live holder keeps its job alive every job_claim_idle_s / 3 (1 s); Redis is down 4 s
    (state saved and loaded back), longer than the claim idle time (3 s); a worker starts the
    moment Redis is back, and the holder's first keep-alive after it is a period later, as it
    may be. Before: the new worker claimed the job at once (delivery 2) and ran it. Now it is
    still the holder's, delivered once, and the new worker ran nothing."""
    idle_s = 3.0
    fake_version(tmp_path / "store", CATEGORY)
    settings = settings_for(tmp_path / "store", private_redis, engine="null", job_claim_idle_s=idle_s,
                            job_max_attempts=3)

    async def main() -> tuple[list[Any], float]:
        holder_conn = RedisConnection(settings, breaker_s=0.0)
        holder = JobQueue(settings, holder_conn)
        await holder.ensure_groups([CATEGORY])
        await holder.submit(CATEGORY, [Upload("a.png", IMAGE)], NO_HEATMAP, None)
        (held,) = await holder.read([CATEGORY], "holder", 8, 1.0)
        private_redis.client().save()
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(idle_s + 1.0)
        await asyncio.to_thread(private_redis.start)
        worker = Worker(settings, name="newcomer")  # its first call to Redis is after the outage
        loop = asyncio.create_task(worker.run())
        try:
            await until(lambda: worker.categories or loop.done(), "the worker to start", 30)
            assert not worker.redis_failed  # it never saw Redis fail
            await asyncio.sleep(idle_s / 3)  # the holder's keep-alive comes round
            await _keep_alive_once_redis_answers(holder, held.stream_id)
            await asyncio.sleep(idle_s)  # past the new worker's first claims either way
            pending = await pending_of(holder_conn, holder)
        finally:
            await stop_running(worker, loop, holder_conn)
        return pending, _done(worker)

    pending, done = asyncio.run(main())
    assert [(p["consumer"], p["times_delivered"]) for p in pending] == [(b"holder", 1)], pending
    assert not done  # the new worker never ran the holder's job


def test_a_dead_workers_job_is_claimed_by_a_worker_started_after_its_death(
        tmp_path: Path, private_redis: RedisServer) -> None:
    """The holder reads the job and dies (no keep-alive ever); a worker started after the job
    went idle claims it once Redis has answered it for one claim idle period (not at once),
    and runs it: delivery 2, done."""
    idle_s = 1.0
    fake_version(tmp_path / "store", CATEGORY)
    settings = settings_for(tmp_path / "store", private_redis, engine="null", job_claim_idle_s=idle_s,
                            job_max_attempts=3)

    async def main() -> tuple[Any, float, float]:
        api_conn = RedisConnection(settings, breaker_s=0.0)
        api = JobQueue(settings, api_conn)
        await api.ensure_groups([CATEGORY])
        job_id = (await api.submit(CATEGORY, [Upload("a.png", IMAGE)], NO_HEATMAP, None)).id
        await api.read([CATEGORY], "dead-holder", 8, 1.0)
        await asyncio.sleep(idle_s + 0.5)  # idle past the claim time before the worker starts
        worker = Worker(settings, name="newcomer")
        loop = asyncio.create_task(worker.run())
        try:
            await until(lambda: worker.categories or loop.done(), "the worker to start", 30)
            started = asyncio.get_running_loop().time()
            await until(lambda: _done(worker) or loop.done(), "the dead worker's job to be run", 10 * idle_s)
            waited = asyncio.get_running_loop().time() - started
            record = await api.records.get(job_id)
        finally:
            await stop_running(worker, loop, api_conn)
        return record, waited, _done(worker)

    record, waited, done = asyncio.run(main())
    assert record is not None and record.status == "done" and record.attempts == 2, record
    assert done == 1
    assert waited >= idle_s * 0.9, waited  # not at once: one claim idle period of Redis answering first


def test_a_dead_workers_job_is_claimed_though_redis_fails_this_worker_more_often_than_the_claim_idle_time(
        tmp_path: Path, private_redis: RedisServer) -> None:
    """A line whose Redis now and then runs a slow command (DEBUG SLEEP 1.6 s, longer than the
    worker's socket timeout of 1.2 s: block 0.2 s + 1 s + 1 MiB at 50 MB/s; no redis-py retry,
    so one timed-out command is one failure, as with a retry a command twice as slow is), every
    9.5 s, less than the claim idle time (10 s). A holder died long ago (its job idle for
    2 x job_claim_idle_s). Before: each failure held claims off for job_claim_idle_s again,
    so the dead worker's job was never claimed (it waited out its TTL and failed). Now the
    hold-off after a failure is one keep-alive period (3.3 s) + the socket timeout + 1 s, and
    the job is claimed and run between two slow commands."""
    idle_s, every_s, sleep_s = 10.0, 9.5, 1.6
    fake_version(tmp_path / "store", CATEGORY)
    settings = settings_for(tmp_path / "store", private_redis, engine="null", job_claim_idle_s=idle_s,
                            job_max_attempts=3, redis_retries=0, max_request_bytes=2**20, max_upload_bytes=2**20,
                            worker_max_input_bytes=2**20)
    admin = private_redis.client(timeout=10.0)

    async def slow_commands(stop: asyncio.Event) -> int:
        done = 0
        while True:
            try:
                await asyncio.wait_for(stop.wait(), 1.0 if not done else every_s - sleep_s)
                return done
            except TimeoutError:
                pass
            await asyncio.to_thread(admin.execute_command, "DEBUG", "SLEEP", sleep_s)
            done += 1

    async def main() -> tuple[Any, float, int, float]:
        api_conn = RedisConnection(settings, breaker_s=0.0)
        api = JobQueue(settings, api_conn)
        await api.ensure_groups([CATEGORY])
        job_id = (await api.submit(CATEGORY, [Upload("a.png", IMAGE)], NO_HEATMAP, None)).id
        (held,) = await api.read([CATEGORY], "dead-holder", 8, 1.0)
        # Its holder died 2 x job_claim_idle_s ago (XCLAIM IDLE sets the idle time; JUSTID counts no delivery).
        await api_conn.client.xclaim(api.stream(CATEGORY), "workers", "dead-holder", 0, [held.stream_id],
                                     idle=int(2 * idle_s * 1000), justid=True)
        worker = Worker(settings, name="claimer")
        loop = asyncio.create_task(worker.run())
        stop_slow = asyncio.Event()
        slow = asyncio.create_task(slow_commands(stop_slow))
        try:
            await until(lambda: worker.categories or loop.done(), "the worker to start", 30)
            deadline = asyncio.get_running_loop().time() + 2 * every_s + 1.0
            while not _done(worker) and not loop.done() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            stop_slow.set()
            slow_commands_run = await slow
            await stop_running(worker, loop)
        errors = worker.metrics.registry.get_sample_value("msflow_redis_errors_total", {"operation": "xreadgroup"})
        record = await api.records.get(job_id)
        await api_conn.aclose()
        return record, _done(worker), slow_commands_run, errors or 0.0

    record, done, slow_commands_run, errors = asyncio.run(main())
    assert slow_commands_run >= 1 and errors >= 1, (slow_commands_run, errors)  # the worker saw Redis fail
    assert done == 1, record
    assert record is not None and record.status == "done" and record.attempts == 2, record
