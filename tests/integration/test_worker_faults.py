"""Faults around a job that are not the job's own, against a real redis-server and the real
worker (in-process, the real engine of the trained test model):

* Redis restarting while a ``heatmap=url`` job stores its links. Before: each restart failed
  the attempt (``redis_unavailable``), so as many restarts as ``job_max_attempts`` during its
  runs dead-lettered a good job. Now the worker reruns it in hand once Redis answers, a
  bounded number of times, without charging an attempt.
* A retried job's record outliving its images. Before: every write of the record renewed its
  TTL, its images kept the submission's, so a retry late in the job's life failed
  ``inputs_missing`` for good. Now a job that is not final keeps its submission's expiry.
* A job that no worker finishes. Before: its record said "delivered 4 times" with
  ``MSFLOW_JOB_MAX_ATTEMPTS=3`` (the fourth delivery is the one that buried it).
* A Redis outage longer than ``job_claim_idle_s`` while a live worker runs a job. Before:
  its keep-alive failed with Redis, so once Redis was back the job looked abandoned, another
  worker claimed it (a delivery charged) and ran it again. Now a worker that saw Redis fail
  makes no claim after it answers again until every live holder's next keep-alive has come
  (``claim_hold_off_s``: a keep-alive period plus a timed-out call, 7.9 s here).
* The input budget as a gauge (``msflow_worker_input_bytes``).
* Redis full (noeviction past maxmemory) after a worker read a job. Before: its "running"
  write refused, the job went back pending, each claim charged it a delivery, and it was
  dead-lettered ``worker_lost`` without ever running. Now it waits in hand until Redis takes it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from harness import CATEGORY, RedisServer, engine_run_replaced, failing_run, until, wait_until
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.redisq.jobs import JobQueue
from service.schemas import HeatmapLink, HeatmapMode, InspectOptions, Upload
from service.worker import Worker
from service.worker.runner import OUTPUT_RERUNS
from worker_fixtures import (CLAIM_IDLE_S, Harness, pending_of, redis, run, settings_for, slow_run,  # noqa: F401  (fixtures)
                             stop_running, store)

LINKS = InspectOptions(heatmap=HeatmapMode.url)
NO_HEATMAP = InspectOptions(heatmap=HeatmapMode.none)


def _errors(worker: Worker, operation: str) -> float:
    return worker.metrics.registry.get_sample_value("msflow_redis_errors_total", {"operation": operation}) or 0.0


async def _run_worker_until_final(worker: Worker, api: JobQueue, submit: Callable[[], Awaitable[str]],
                                  make_run: Callable[[Any], Any], timeout: float) -> Any:
    """The worker's own loop (claims, reads, steps), its engine's batches run by
    ``make_run(real_run)``, until the job ``submit`` queues has a final record."""
    loop = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.categories or loop.done(), "the worker to start", 120)
        assert not loop.done(), loop.exception()
        with engine_run_replaced(worker.runtime.registry.get(CATEGORY).engine, make_run):
            job_id = await submit()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert not loop.done(), loop.exception()
                try:
                    record = await api.records.get(job_id)
                except RedisUnavailable:  # restarting under the test
                    record = None
                if record is not None and record.status in ("done", "failed"):
                    return record
                await asyncio.sleep(0.05)
        raise AssertionError(f"job {job_id} not final after {timeout} s")
    finally:
        await stop_running(worker, loop)


def test_redis_restarts_while_a_job_stores_its_links_cost_it_no_attempt(
        store: Path, private_redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    """Three restarts (state saved and loaded back, as a Redis with persistence does), each
    while the job's engine batch runs, so its heatmap link finds Redis gone: with
    job_max_attempts 2 the job was dead-lettered at the second. Now it is done, at its first
    delivery, its link in Redis."""
    settings = settings_for(store, private_redis, job_max_attempts=2)
    restarts: list[float] = []

    def bring_back(errors_before: float, worker: Worker) -> None:
        # Once the link's write has failed (not before: the restart must fall inside the run).
        wait_until(lambda: _errors(worker, "heatmap_put") > errors_before, 30, "the link's write to fail")
        private_redis.start()

    async def main() -> tuple[Any, bytes | None, int, int]:
        worker = Worker(settings, name="faults")
        api_conn = RedisConnection(settings)
        api = JobQueue(settings, api_conn)

        def restarting(real_run: Any) -> Any:
            def run_batch(batch: Any) -> Any:
                if len(restarts) < 3:
                    errors_before = _errors(worker, "heatmap_put")
                    private_redis.client().save()
                    private_redis.stop()
                    restarts.append(time.monotonic())
                    threading.Thread(target=bring_back, args=(errors_before, worker), daemon=True).start()
                return real_run(batch)
            return run_batch

        async def submit() -> str:
            upload = Upload(good_images[0].name, good_images[0].read_bytes())
            return (await api.submit(CATEGORY, [upload], LINKS, None)).id

        record = await _run_worker_until_final(worker, api, submit, restarting, 90)
        link = record.result.results[0].heatmap if record.result is not None else None
        png = None
        if isinstance(link, HeatmapLink):
            png = await api_conn.client.get(settings.redis_prefix + "heatmap:" + link.url.split("/")[-1][:-4])
        letters = await api_conn.client.xlen(api.dead_letter_stream)
        pending = (await api_conn.client.xpending(api.stream(CATEGORY), "workers"))["pending"]
        await api_conn.aclose()
        return record, png, letters, pending

    record, png, letters, pending = asyncio.run(main())
    assert len(restarts) == 3
    assert record.status == "done", record.error
    assert record.attempts == 1 and record.error is None
    assert png is not None and png.startswith(b"\x89PNG")
    assert letters == 0 and pending == 0


def test_a_job_whose_links_can_never_be_stored_still_spends_its_attempts(
        store: Path, private_redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    """The reruns in hand are bounded: a worker whose Redis user may not write heatmap links
    (Redis answers, and refuses) reruns each delivery OUTPUT_RERUNS times, then the attempt is
    charged, and the job is dead-lettered after job_max_attempts like any failing job."""
    admin = private_redis.client()
    prefix = "msflow-faults-acl:"
    # Everything of the prefix but the heatmap links (read-only there).
    admin.execute_command("ACL", "SETUSER", "nolinks", "on", ">pw", "+@all", f"~{prefix}[^h]*",
                          f"%R~{prefix}h*")
    url = f"redis://nolinks:pw@127.0.0.1:{private_redis.port}/0"
    settings = settings_for(store, private_redis, redis_url=url, redis_prefix=prefix, job_max_attempts=2)
    runs: list[int] = []

    def counting(real_run: Any) -> Any:
        def run_batch(batch: Any) -> Any:
            runs.append(len(batch))
            return real_run(batch)
        return run_batch

    async def main() -> tuple[Any, int]:
        worker = Worker(settings, name="faults-acl")
        api_conn = RedisConnection(settings)
        api = JobQueue(settings, api_conn)

        async def submit() -> str:
            upload = Upload(good_images[1].name, good_images[1].read_bytes())
            return (await api.submit(CATEGORY, [upload], LINKS, None)).id

        record = await _run_worker_until_final(worker, api, submit, counting, 60)
        letters = await api_conn.client.xlen(api.dead_letter_stream)
        await api_conn.aclose()
        return record, letters

    record, letters = asyncio.run(main())
    assert record.status == "failed" and record.error is not None, record
    assert record.error.code == "redis_unavailable" and record.attempts == 2
    assert len(runs) == 2 * (1 + OUTPUT_RERUNS) and letters == 1


def test_a_retried_jobs_record_does_not_outlive_its_images(store: Path, redis: RedisServer,  # noqa: F811
                                                            good_images: list[Path]) -> None:
    """job_ttl_s 3: the job waits 1.5 s, its first attempt fails (engine error) and is written
    back queued; its retry, claimed at about 3.3 s, found the record (renewed for 3 s by that
    write) but not the images (expired at 3 s): failed inputs_missing, for good."""
    settings = settings_for(store, redis, redis_prefix="msflow-faults-ttl:", job_ttl_s=3.0, job_max_attempts=3)
    client = redis.client()

    async def body(h: Harness) -> dict[str, Any]:
        job_id = await h.submit([Upload(good_images[2].name, good_images[2].read_bytes())], NO_HEATMAP)
        submitted = time.monotonic()
        await asyncio.sleep(1.5)
        with engine_run_replaced(h.worker.runtime.registry.get(CATEGORY).engine, failing_run("device lost")):
            assert await h.step() == 1
        assert (await h.record(job_id)).status == "queued"
        ttls = (client.pttl(f"msflow-faults-ttl:job:{job_id}"), client.pttl(f"msflow-faults-ttl:job:{job_id}:images"))
        await asyncio.sleep(max(0.0, submitted + 3.3 - time.monotonic()))
        claimed = await h.step(claim=True)
        return {"ttls": ttls, "claimed": claimed, "record": await h.queue.records.get(job_id),
                "expired": h.count("expired"), "failed": h.count("dead_lettered")}

    out = run(settings, body)
    record_ttl, images_ttl = out["ttls"]
    assert 0 < record_ttl <= images_ttl + 50, out["ttls"]  # the record goes no later than its images
    # The retry finds the job expired (its GET 404, as for any job past its TTL), not failed.
    assert out["record"] is None and out["failed"] == 0, out["record"]


def test_a_job_no_worker_finishes_says_how_often_it_ran(store: Path, redis: RedisServer,  # noqa: F811
                                                         good_images: list[Path]) -> None:
    """Three deliveries end without an outcome (workers that died: here, deliveries nobody
    ran); the fourth, with job_max_attempts 3, dead-letters it. The record said "the job was
    delivered 4 times", attempts 4, with a limit of 3."""
    settings = settings_for(store, redis, redis_prefix="msflow-faults-lost:", job_max_attempts=3)

    async def body(h: Harness) -> tuple[Any, list[Any]]:
        job_id = await h.submit([Upload(good_images[3].name, good_images[3].read_bytes())], NO_HEATMAP)
        assert len(await h.worker.queue.read([CATEGORY], "dead-1", 8, 1.0)) == 1
        for n in (2, 3, 4):
            await asyncio.sleep(CLAIM_IDLE_S + 0.05)
            claimed = await h.worker.queue.claim(CATEGORY, f"dead-{n}" if n < 4 else h.worker.name, 8)
            assert [d.deliveries for d in claimed] == [n]
        await h.worker.runner.process(CATEGORY, claimed)
        letters = [f for _, f in await h.api.client.xrange(h.queue.dead_letter_stream)]
        return await h.record(job_id), letters

    record, letters = run(settings, body)
    assert record.status == "failed" and record.error is not None and record.error.code == "worker_lost"
    assert "ran 3 times" in record.error.message and "MSFLOW_JOB_MAX_ATTEMPTS" in record.error.message
    assert "4" not in record.error.message, record.error.message
    assert record.attempts == 3
    assert [(f[b"attempts"], f[b"error_code"]) for f in letters] == [(b"3", b"worker_lost")]


def test_the_input_budget_is_a_gauge(store: Path, redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    """msflow_worker_input_bytes{kind=budget} is MSFLOW_WORKER_MAX_INPUT_BYTES; {kind=held}
    follows what the worker holds: above 0 while jobs run, never over the budget, 0 after."""
    uploads = [[Upload(f"g{j}-{p.name}", p.read_bytes())] for j, p in enumerate(good_images[:4])]
    budget = 2 * max(len(u[0].data) for u in uploads)
    settings = settings_for(store, redis, redis_prefix="msflow-faults-gauge:", worker_max_input_bytes=budget)

    async def body(h: Harness) -> dict[str, Any]:
        def gauge(kind: str) -> float | None:
            return h.worker.metrics.registry.get_sample_value("msflow_worker_input_bytes", {"kind": kind})

        for u in uploads:
            await h.submit(u, NO_HEATMAP)
        deliveries = await h.worker.queue.read([CATEGORY], h.worker.name, 8, 1.0)
        seen: list[tuple[float | None, int]] = []
        with engine_run_replaced(h.worker.runtime.registry.get(CATEGORY).engine, slow_run(0.2)):
            step = asyncio.create_task(h.worker.step(deliveries))
            while not step.done():
                seen.append((gauge("held"), h.worker.inputs.held))
                await asyncio.sleep(0.01)
            await step
        return {"seen": seen, "budget": gauge("budget"), "after": gauge("held")}

    out = run(settings, body)
    assert out["budget"] == budget and out["after"] == 0
    assert all(g == held for g, held in out["seen"]), out["seen"]  # the gauge is what is held
    assert 0 < max(g or 0 for g, _ in out["seen"]) <= budget


def test_a_redis_outage_longer_than_the_claim_idle_time_does_not_hand_a_live_workers_job_to_another(
        store: Path, private_redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    """A live holder keeps its job alive as a worker does (every job_claim_idle_s / 3, 3 s);
    Redis is down 10 s (state saved and loaded back), longer than the claim idle time (9 s),
    and the holder's first keep-alive after it comes back is a period later, as it may be.
    Before: a worker in its loop claimed the job within a second of Redis's return (delivery
    2, charged to the job) and ran it again. Now it makes no claim for claim_hold_off_s after
    Redis answers again, by when every live holder has refreshed its claims."""
    idle_s = 9.0
    settings = settings_for(store, private_redis, job_claim_idle_s=idle_s, job_max_attempts=3)

    async def main() -> tuple[list[Any], float | None]:
        worker = Worker(settings, name="claimer")
        holder_conn = RedisConnection(settings, breaker_s=0.0)
        holder = JobQueue(settings, holder_conn)
        upload = Upload(good_images[4].name, good_images[4].read_bytes())
        await holder.ensure_groups([CATEGORY])
        job_id = (await holder.submit(CATEGORY, [upload], NO_HEATMAP, None)).id
        (held,) = await holder.read([CATEGORY], "holder", 8, 1.0)
        loop = asyncio.create_task(worker.run())
        try:
            await until(lambda: worker.categories or loop.done(), "the worker to start", 120)
            await asyncio.sleep(1.0)
            await holder.keep_alive(CATEGORY, "holder", [held.stream_id])
            private_redis.client().save()
            await asyncio.to_thread(private_redis.stop)
            await asyncio.sleep(idle_s + 1.0)
            await asyncio.to_thread(private_redis.start)
            await asyncio.sleep(idle_s / 3)  # the holder's keep-alive comes round
            while True:
                try:
                    await holder.keep_alive(CATEGORY, "holder", [held.stream_id])
                    break
                except RedisUnavailable:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)  # a claim made meanwhile has run its job by now
            pending = await pending_of(holder_conn, holder)
        finally:
            await stop_running(worker, loop, holder_conn)
        assert job_id
        done = worker.metrics.registry.get_sample_value("msflow_jobs_total", {"category": CATEGORY, "outcome": "done"})
        return pending, done

    pending, done = asyncio.run(main())
    assert [(p["consumer"], p["times_delivered"]) for p in pending] == [(b"holder", 1)], pending
    assert not done  # the claimer never ran the holder's job


def test_a_job_read_while_redis_is_full_waits_in_hand_and_runs_once_it_has_room(
        store: Path, private_redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    """Redis fills up (maxmemory, noeviction) right after a worker read a job: the job's
    "running" write is refused, while reads and claims (XREADGROUP, XAUTOCLAIM are not refused)
    go on. Before: the job went back pending and each claim charged it a delivery, so a Redis
    full for a few claim periods dead-lettered it as worker_lost ("the job ran 2 times") though
    it never ran. Now the worker keeps it in hand, retrying the write, and runs it once Redis has
    room: done at its first delivery."""
    settings = settings_for(store, private_redis, job_max_attempts=2)
    client = private_redis.client()

    async def main() -> tuple[Any, int, list[Any]]:
        worker = Worker(settings, name="full")
        api_conn = RedisConnection(settings)
        api = JobQueue(settings, api_conn)
        real_read = worker.following.read
        filled: list[bool] = []

        async def read_then_fill(count: int, block_s: float) -> list[Any]:
            deliveries = await real_read(count, block_s)
            if deliveries and not filled:
                filled.append(True)
                used = int(client.info("memory")["used_memory"])
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("maxmemory", str(used // 2))
                threading.Timer(2.5, client.config_set, ("maxmemory", "0")).start()
            return deliveries

        worker.following.read = read_then_fill  # type: ignore[method-assign]

        async def submit() -> str:
            upload = Upload(good_images[5].name, good_images[5].read_bytes())
            return (await api.submit(CATEGORY, [upload], NO_HEATMAP, None)).id

        try:
            record = await _run_worker_until_final(worker, api, submit, lambda real_run: real_run, 30)
            letters = await api_conn.client.xlen(api.dead_letter_stream)
            pending = await pending_of(api_conn, api)
        finally:
            await api_conn.aclose()
        return record, letters, pending

    record, letters, pending = asyncio.run(main())
    assert record.status == "done", record.error
    assert record.attempts == 1 and letters == 0 and pending == []
