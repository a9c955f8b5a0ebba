"""The worker's job-processing step in-process (``JobRunner.process``), against a private
redis-server on a free port and the real engine of the trained test model: concurrent jobs
share the lane's batches, results match the synchronous path, a bad image or an engine error
fails only its jobs (retried, then dead-lettered), links land in Redis, threshold overrides
apply, metrics count.

In tests/integration, not tests/unit: it needs the session's model store (a trained model,
about 80 s on 2 cores); no server or worker subprocess is started.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import CATEGORY, RedisServer, copy_version, engine_run_replaced, failing_run
from service.pipeline.item import InspectedImage
from service.pipeline.runtime import PipelineRuntime
from service.pipeline.thresholds import ThresholdOverrides
from service.redisq.jobs import JobQueue
from service.redisq.records import JobRecord
from service.schemas import HeatmapLink, HeatmapMode, InspectOptions, Upload
from worker_fixtures import CLAIM_IDLE_S, PREFIX, Harness, redis, run, settings_for, slow_run, store  # noqa: F401  (fixtures)


def test_concurrent_jobs_share_batches_and_answer_like_the_api(store: Path, redis: RedisServer,
                                                               good_images: list[Path]) -> None:
    uploads = [Upload(p.name, p.read_bytes()) for p in good_images[:4]]

    async def body(h: Harness) -> dict[str, Any]:
        inline = await h.submit(uploads[:2])
        linked = await h.submit(uploads[2:], InspectOptions(heatmap=HeatmapMode.url))
        assert await h.step() == 2
        out = {"inline": await h.record(inline), "linked": await h.record(linked)}
        link = out["linked"].result.results[0].heatmap
        assert isinstance(link, HeatmapLink)  # the worker serves no HTTP: the PNG must be in Redis
        out["png"] = await h.api.client.get(f"{PREFIX}heatmap:{link.url.split('/')[-1][:-4]}")
        out["pending"] = (await h.api.client.xpending(h.queue.stream(CATEGORY), "workers"))["pending"]
        out["done"] = h.count("done")
        return out

    out = run(settings_for(store, redis), body)
    for key in ("inline", "linked"):
        record = out[key]
        assert record.status == "done" and record.worker == "inproc" and record.attempts == 1 and record.error is None
        assert record.result.category == CATEGORY and record.result.request_id == record.id
        # the two jobs' four images went through the lane's batcher together
        assert [r.batch_size for r in record.result.results] == [4, 4]
        assert all(r.timings_ms.queue > 0 for r in record.result.results)  # time in the stream counts
        for r in record.result.results:  # the three-way verdict travels with job results too
            expected = "ok" if r.raw_score < r.threshold else "ng" if r.raw_score >= r.ng_threshold else "review"
            assert r.verdict == expected and r.is_anomalous == (r.raw_score >= r.threshold)
    assert out["png"] and out["png"].startswith(b"\x89PNG") and out["pending"] == 0 and out["done"] == 2

    # The same numbers and shape as the synchronous path (the runtime alone, in-process).
    async def direct() -> list[InspectedImage]:
        rt = PipelineRuntime(settings_for(store, redis, redis_url=None), None)
        rt.open()
        await rt.registry.load_all()
        items = [InspectedImage.received(i, u) for i, u in enumerate(uploads[:2])]
        try:
            with rt.pin(CATEGORY) as lane:
                await rt.run(lane, items, InspectOptions(), time.monotonic() + 30, time.monotonic())
        finally:
            await rt.close()
        return items

    for got, want in zip(out["inline"].result.results, asyncio.run(direct())):
        assert set(got.model_dump()) == set(want.answer.model_dump())
        assert got.raw_score == pytest.approx(want.answer.raw_score, abs=1e-5)
        assert (got.index, got.filename, got.threshold) == (want.answer.index, want.answer.filename,
                                                            want.answer.threshold)
        assert got.heatmap is not None and got.heatmap.model_dump().keys() == want.answer.heatmap.model_dump().keys()  # type: ignore[union-attr]


def test_failures_stay_with_their_jobs_then_retry_and_dead_letter(store: Path, redis: RedisServer,
                                                                  good_images: list[Path]) -> None:
    whole = good_images[5].read_bytes()

    async def body(h: Harness) -> None:
        bad = await h.submit([Upload("cut.png", whole[: len(whole) // 2])])  # header fine, pixels truncated
        good = await h.submit([Upload("ok.png", good_images[6].read_bytes())])
        assert await h.step() == 2
        dead = await h.record(bad)  # undecodable: another attempt would fail the same way, so no retry
        assert dead.status == "failed" and dead.attempts == 1 and dead.error is not None
        assert dead.error.code == "undecodable_image"
        assert (await h.record(good)).status == "done"  # the bad image failed only its own job

        # An engine error fails the jobs of its batch; they are retried.
        with h.worker.runtime.pin(CATEGORY) as lane:
            engine = lane.model.engine
        first = await h.submit([Upload("a.png", good_images[0].read_bytes())])
        second = await h.submit([Upload("b.png", good_images[1].read_bytes())])
        with engine_run_replaced(engine, failing_run("device lost")):
            assert await h.step() == 2
        for job in (first, second):
            record = await h.record(job)
            assert record.status == "queued" and record.error is not None and record.error.code == "engine_error"
            # The engine's own text stays in the worker's log: job records are read by clients.
            assert "device lost" not in record.error.message and "engine failed" in record.error.message
        assert h.count("retried") == 2

        # After the idle timeout: the retries are claimed and succeed on attempt 2.
        await asyncio.sleep(CLAIM_IDLE_S + 0.1)
        assert await h.step(claim=True) == 2
        for job in (first, second):
            record = await h.record(job)
            assert record.status == "done" and record.attempts == 2 and record.error is None
        letters = await h.api.client.xrange(h.queue.dead_letter_stream)
        assert [f[b"job_id"] for _, f in letters] == [bad.encode()]
        assert (await h.api.client.xpending(h.queue.stream(CATEGORY), "workers"))["pending"] == 0
        assert h.count("dead_lettered") == 1 and h.count("done") == 3

        # A non-finite engine output is an error, never a verdict: dead-lettered, not retried
        nan_job = await h.submit([Upload("c.png", good_images[2].read_bytes())])
        all_nan = lambda real_run: lambda batch: (np.full(len(batch), np.nan, np.float32), real_run(batch)[1])
        with engine_run_replaced(engine, all_nan):
            assert await h.step() == 1
        record = await h.record(nan_job)
        assert record.status == "failed" and record.result is None and record.error.code == "non_finite_output"
        assert h.worker.runtime.registry.unhealthy.keys() == {CATEGORY}

        # A record that does not validate is dead-lettered once, not redelivered forever
        broken = await h.submit([Upload("d.png", good_images[3].read_bytes())])
        await h.api.client.set(h.queue.records.record_key(broken), b'{"id": "not a record"}')
        assert await h.step() == 1
        letters = await h.api.client.xrange(h.queue.dead_letter_stream)
        assert [f[b"error_code"] for _, f in letters if f[b"job_id"] == broken.encode()] == [b"invalid_record"]
        assert (await h.api.client.xpending(h.queue.stream(CATEGORY), "workers"))["pending"] == 0

    run(settings_for(store, redis, redis_prefix="msflow-inproc-fail:"), body)


def test_a_failed_jobs_error_names_the_bad_image_as_the_synchronous_answer_does(
        store: Path, redis: RedisServer, good_images: list[Path]) -> None:
    """POST /v1/inspect's 422 carries ``details: {index, filename}``; a job's error had null
    there, so a client of a 32-image job could not tell which image to fix."""
    whole = good_images[5].read_bytes()

    async def body(h: Harness) -> None:
        job = await h.submit([Upload("ok.png", good_images[6].read_bytes()),
                              Upload("cut.png", whole[: len(whole) // 2])])
        assert await h.step() == 1
        record = await h.record(job)
        assert record.status == "failed" and record.error is not None and record.error.code == "undecodable_image"
        assert record.error.details == {"index": 1, "filename": "cut.png"}

    run(settings_for(store, redis, redis_prefix="msflow-inproc-details:"), body)


def test_threshold_overrides_apply_to_jobs(store: Path, redis: RedisServer, good_images: list[Path]) -> None:
    async def body(h: Harness) -> None:
        before = await h.submit([Upload("g.png", good_images[2].read_bytes())], InspectOptions(heatmap=HeatmapMode.none))
        await h.step()
        result = (await h.record(before)).result.results[0]
        assert not result.is_anomalous and result.threshold > result.raw_score
        # An operator lowers the threshold below this image's score (through Redis, as the API does).
        overrides = ThresholdOverrides(h.settings, h.api)
        await overrides.set(CATEGORY, result.model_version, result.raw_score - 1e-3)
        await h.worker.runtime.thresholds.refresh([(CATEGORY, result.model_version)])
        after = await h.submit([Upload("g.png", good_images[2].read_bytes())], InspectOptions(heatmap=HeatmapMode.none))
        await h.step()
        moved = (await h.record(after)).result.results[0]
        assert moved.is_anomalous and moved.threshold == pytest.approx(result.raw_score - 1e-3)
        assert moved.raw_score == pytest.approx(result.raw_score, abs=1e-5)

    run(settings_for(store, redis, redis_prefix="msflow-inproc-thr:"), body)


def test_every_job_in_hand_is_kept_alive_even_while_it_waits_for_room(store: Path, redis: RedisServer,
                                                                      good_images: list[Path]) -> None:
    """Two jobs read together; the pixel budget runs one at a time and each takes 1 s of engine,
    over three claim-idle periods. Another consumer trying to claim all along gets nothing:
    the job waiting for room is kept alive too, so no job runs twice."""
    settings = settings_for(store, redis, max_request_megapixels=0.06, max_inflight_megapixels=0.06)

    async def body(h: Harness) -> dict[str, Any]:
        jobs = [await h.submit([Upload(f"k{i}.png", good_images[i].read_bytes())], InspectOptions(heatmap=HeatmapMode.none))
                for i in range(2)]
        deliveries = await h.worker.queue.read([CATEGORY], h.worker.name, 8, 1.0)
        assert len(deliveries) == 2
        thief = JobQueue(settings, h.api)
        stolen: list[Any] = []
        lane = h.worker.runtime.registry.get(CATEGORY)
        with engine_run_replaced(lane.engine, slow_run(1.0)):
            step = asyncio.create_task(h.worker.step(deliveries))
            while not step.done():
                stolen += await thief.claim(CATEGORY, "thief", 8)
                await asyncio.sleep(0.1)
            await step
        return {"stolen": stolen, "records": [await h.record(j) for j in jobs]}

    out = run(settings, body)
    assert out["stolen"] == []
    assert [(r.status, r.attempts, r.worker) for r in out["records"]] == [("done", 1, "inproc")] * 2


def test_keep_alive_covers_every_category_of_a_read(store: Path, redis: RedisServer,
                                                    good_images: list[Path]) -> None:
    """One read brings jobs of two categories; the slow one (1.5 s of engine, five claim-idle
    periods) stays claimed the whole time, however soon the fast category is done: a second
    consumer claiming both streams all along gets nothing, and no job runs twice."""
    (store / "gravel").mkdir()
    copy_version(store / CATEGORY / "1", store / "gravel" / "1", "gravel", "1")
    settings = settings_for(store, redis)

    async def body(h: Harness) -> dict[str, Any]:
        brick = await h.submit([Upload("slow.png", good_images[0].read_bytes())], InspectOptions(heatmap=HeatmapMode.none))
        gravel = (await h.queue.submit("gravel", [Upload("fast.png", good_images[1].read_bytes())],
                                       InspectOptions(heatmap=HeatmapMode.none), request_id=None)).id
        deliveries = await h.worker.queue.read([CATEGORY, "gravel"], h.worker.name, 8, 1.0)
        assert sorted(d.message.category for d in deliveries) == ["brick", "gravel"]
        thief = JobQueue(settings, h.api)
        stolen: list[Any] = []
        with engine_run_replaced(h.worker.runtime.registry.get(CATEGORY).engine, slow_run(1.5)):
            step = asyncio.create_task(h.worker.step(deliveries))
            while not step.done():
                for category in (CATEGORY, "gravel"):
                    stolen += await thief.claim(category, "thief", 8)
                await asyncio.sleep(0.1)
            await step
        return {"stolen": stolen, "records": [await h.record(j) for j in (brick, gravel)]}

    out = run(settings, body)
    assert out["stolen"] == []
    assert [(r.status, r.attempts) for r in out["records"]] == [("done", 1)] * 2


def test_finished_records_past_their_budget_evict_the_oldest_and_a_result_past_all_of_it_fails(
        store: Path, redis: RedisServer, good_images: list[Path]) -> None:
    """A finished record past job_max_results_bytes evicts the oldest (counted); a result larger
    than the whole budget was written anyway, evicting every other: its job fails instead."""
    upload = [Upload(good_images[0].name, good_images[0].read_bytes())]
    small = InspectOptions(heatmap=HeatmapMode.none)
    client = redis.client()

    def charged(prefix: str) -> int:
        return int(client.hget(f"{prefix}budget:job-results:{CATEGORY}:bytes", "#total") or 0)

    async def measure(h: Harness) -> None:
        await h.submit(upload, small)
        assert await h.step() == 1

    # a prefix of its own: the other tests' finished records would be evicted (and counted) too
    run(settings_for(store, redis, redis_prefix="msflow-inproc-one:"), measure)
    one = charged("msflow-inproc-one:")  # one small record's cost
    prefix = "msflow-inproc-budget:"

    async def body(h: Harness) -> tuple[list[JobRecord | None], float | None, float]:
        jobs = []
        for options in (small, small, small, InspectOptions(heatmap=HeatmapMode.inline, overlay=True)):
            jobs.append(await h.submit(upload, options))
            assert await h.step() == 1
        evicted = h.worker.metrics.registry.get_sample_value("msflow_redis_evictions_total", {"store": "job_results"})
        return [await h.queue.records.get(j) for j in jobs], evicted, h.count("dead_lettered")

    budget = one * 5 // 2
    (first, second, third, big), evicted, dead = run(
        settings_for(store, redis, job_max_results_bytes=budget, redis_prefix=prefix), body)
    assert first is None and third is not None and third.status == "done" and evicted is not None and evicted >= 1
    assert big is not None and big.status == "failed" and big.result is None and dead == 1
    assert big.error is not None and big.error.code == "result_too_large" and "MSFLOW_JOB_MAX_RESULTS_BYTES" in big.error.message
    assert charged(prefix) <= budget


def test_an_outcome_computed_during_a_redis_restart_is_recorded_once_it_is_back(
        store: Path, private_redis: RedisServer, good_images: list[Path]) -> None:
    """The result was dropped when Redis refused its write (a restart, a failover): the job
    was rerun, and repeated, dead-lettered as worker_lost. Now the write waits for Redis."""
    upload = [Upload(good_images[0].name, good_images[0].read_bytes())]

    async def body(h: Harness) -> tuple[bool, JobRecord | None]:
        job_id = await h.submit(upload, InspectOptions(heatmap=HeatmapMode.none))
        jobs = await h.computed(await h.worker.queue.read([CATEGORY], h.worker.name, 8, 1.0))
        private_redis.stop()  # no persistence here: Redis comes back empty, the outcome alone is written
        finishing = asyncio.create_task(h.worker.runner._finish(CATEGORY, jobs[0]))
        await asyncio.sleep(1.5)
        waited = not finishing.done()
        await asyncio.to_thread(private_redis.start)
        await asyncio.wait_for(finishing, 10)
        return waited, await h.queue.records.get(job_id)

    waited, record = run(settings_for(store, private_redis), body)
    assert waited, "the outcome's write waited for Redis"
    assert record is not None and record.status == "done" and record.result is not None


def test_a_job_finished_twice_counts_once(store: Path, redis: RedisServer, good_images: list[Path]) -> None:
    """A job claimed from a worker that stalled, then finished by both: one final record, and
    msflow_jobs_total counts one done and one duplicate (it counted two done)."""
    upload = [Upload(good_images[0].name, good_images[0].read_bytes())]

    async def body(h: Harness) -> tuple[float, float]:
        await h.submit(upload, InspectOptions(heatmap=HeatmapMode.none))
        jobs = await h.computed(await h.worker.queue.read([CATEGORY], h.worker.name, 8, 1.0))
        await h.worker.runner._finish(CATEGORY, jobs[0])
        await h.worker.runner._finish(CATEGORY, jobs[0])  # the stalled worker's write, late
        return h.count("done"), h.count("duplicate")

    assert run(settings_for(store, redis, redis_prefix="msflow-inproc-twice:"), body) == (1.0, 1.0)


def test_an_unreadable_record_fails_readably_and_frees_its_inputs(store: Path, redis: RedisServer,
                                                                   good_images: list[Path]) -> None:
    """A record this version cannot read (an older schema, damage) was dead-lettered, but its
    images and their charge on the backlog's bytes stayed for job_ttl_s, and its GET answered
    a bare 500. Now it is written over as failed, with the reason."""
    upload = [Upload(good_images[0].name, good_images[0].read_bytes())]
    prefix = "msflow-inproc-unreadable:"
    client = redis.client()

    async def body(h: Harness) -> JobRecord | None:
        job_id = await h.submit(upload)
        client.set(f"{prefix}job:{job_id}", b'{"id": "' + job_id.encode() + b'", "status": "queued"}')
        assert await h.step() == 1
        return await h.record(job_id)

    record = run(settings_for(store, redis, redis_prefix=prefix), body)
    assert record.status == "failed" and record.error is not None and record.error.code == "invalid_record"
    assert client.exists(f"{prefix}job:{record.id}:images") == 0
    assert int(client.hget(f"{prefix}jobs-inputs:{CATEGORY}:bytes", "#total")) == 0
