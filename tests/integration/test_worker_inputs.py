"""The worker's input budget (``MSFLOW_WORKER_MAX_INPUT_BYTES``), in-process against a
private redis-server and the real engine of the trained test model.

Before: a read of up to ``max_batch_size`` jobs fetched every job's images in one round trip
and held them all while the jobs ran: up to 8 x 64 MiB at the defaults, before the pixel
budget looked at any of them (a worker sized for its usual jobs was killed by a read of large
ones, and every job of the read with it). Now each job's bytes are taken from the budget
before its fetch: the jobs of a read are fetched in turn, in order, those that fit together
in one round trip (their images still share engine batches), the others wait in hand, kept
alive; a job larger than the whole budget runs alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from harness import CATEGORY, RedisServer, engine_run_replaced
from service.redisq.jobs import JobQueue
from service.schemas import HeatmapMode, InspectOptions, Upload
from service.worker.inputs import InputBudget
from worker_fixtures import Harness, redis, run, settings_for, slow_run, store  # noqa: F401  (fixtures)

NO_HEATMAP = InspectOptions(heatmap=HeatmapMode.none)


def _payload_bytes(reply: Any) -> int:
    """The bytes of every bulk string in a Redis reply (nested lists included)."""
    if isinstance(reply, bytes):
        return len(reply)
    if isinstance(reply, (list, tuple)):
        return sum(_payload_bytes(x) for x in reply)
    return 0


def _count_round_trips(h: Harness) -> list[int]:
    """The payload bytes of each of the worker's Redis round trips from now on: whatever
    fetches the images, no single round trip may carry more than the budget."""
    sizes: list[int] = []
    real_run = h.worker.conn.run

    async def counted(op: str, fn: Any) -> Any:
        reply = await real_run(op, fn)
        sizes.append(_payload_bytes(reply))
        return reply

    h.worker.conn.run = counted  # type: ignore[method-assign]
    return sizes


def test_a_read_of_many_jobs_holds_at_most_the_budget_of_inputs_and_each_job_gets_its_own_result(
        store: Path, redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    jobs_in = [[Upload(f"j{j}-{p.name}", p.read_bytes()) for p in (good_images[j % 8], good_images[(j + 1) % 8])]
               for j in range(6)]
    sizes = [sum(len(u.data) for u in uploads) for uploads in jobs_in]
    budget = 2 * max(sizes) + max(sizes) // 2  # two jobs at a time, never three
    settings = settings_for(store, redis, redis_prefix="msflow-inputs-many:", worker_max_input_bytes=budget,
                            max_batch_size=8)

    async def body(h: Harness) -> dict[str, Any]:
        ids = [await h.submit(uploads, NO_HEATMAP) for uploads in jobs_in]
        deliveries = await h.worker.queue.read([CATEGORY], h.worker.name, 8, 1.0)
        assert len(deliveries) == 6  # one read, as the worker's loop makes it
        trips = _count_round_trips(h)
        await h.worker.step(deliveries)
        return {"records": [await h.record(i) for i in ids], "trips": trips, "peak": h.worker.inputs.peak,
                "held": h.worker.inputs.held,
                "pending": (await h.api.client.xpending(h.queue.stream(CATEGORY), "workers"))["pending"]}

    out = run(settings, body)
    assert max(out["trips"]) <= budget, f"one round trip carried {max(out['trips'])} bytes, budget {budget}"
    assert max(sizes) <= out["peak"] <= budget and out["held"] == 0
    assert sum(1 for t in out["trips"] if t >= min(sizes)) >= 3  # the images came in turns, not at once
    scores: dict[str, float] = {}
    for uploads, record in zip(jobs_in, out["records"]):
        assert (record.status, record.attempts, record.error) == ("done", 1, None)
        assert [r.filename for r in record.result.results] == [u.filename for u in uploads]  # its own
        for r in record.result.results:  # the same image scores the same whichever job carried it
            image = r.filename.split("-", 1)[1]
            assert r.raw_score == pytest.approx(scores.setdefault(image, r.raw_score), abs=1e-4)
    # the jobs fetched together still share engine batches (each job has two images)
    assert max(r.batch_size for record in out["records"] for r in record.result.results) >= 4
    assert out["pending"] == 0


def test_a_job_larger_than_the_budget_runs_alone_and_those_waiting_stay_in_hand(
        store: Path, redis: RedisServer, good_images: list[Path]) -> None:  # noqa: F811
    """Three jobs, each larger than the whole budget: each is fetched and run alone, in order,
    and the ones waiting are kept alive meanwhile (0.4 s of engine each, over three claim-idle
    periods in all): a consumer claiming all along gets nothing, and none runs twice."""
    jobs_in = [[Upload(f"big{j}.png", good_images[j].read_bytes())] for j in range(3)]
    settings = settings_for(store, redis, redis_prefix="msflow-inputs-alone:", worker_max_input_bytes=1000)

    async def body(h: Harness) -> dict[str, Any]:
        ids = [await h.submit(uploads, NO_HEATMAP) for uploads in jobs_in]
        deliveries = await h.worker.queue.read([CATEGORY], h.worker.name, 8, 1.0)
        thief = JobQueue(settings, h.api)
        stolen: list[Any] = []
        trips = _count_round_trips(h)
        with engine_run_replaced(h.worker.runtime.registry.get(CATEGORY).engine, slow_run(0.4)):
            step = asyncio.create_task(h.worker.step(deliveries))
            while not step.done():
                stolen += await thief.claim(CATEGORY, "thief", 8)
                await asyncio.sleep(0.1)
            await step
        return {"records": [await h.record(i) for i in ids], "trips": trips, "stolen": stolen,
                "peak": h.worker.inputs.peak}

    out = run(settings, body)
    assert out["stolen"] == []
    largest = max(len(u.data) for uploads in jobs_in for u in uploads)
    assert out["peak"] == largest  # alone: nothing held beside it
    assert sum(1 for t in out["trips"] if t >= min(len(u[0].data) for u in jobs_in)) == 3  # one fetch each
    for uploads, record in zip(jobs_in, out["records"]):
        assert (record.status, record.attempts) == ("done", 1)
        assert [r.filename for r in record.result.results] == [uploads[0].filename]
        assert record.result.results[0].batch_size == 1


def test_the_budget_serves_in_order_and_a_cancelled_wait_holds_nothing() -> None:
    async def main() -> None:
        budget = InputBudget(100)
        assert await budget.take([60, 30, 30]) == 2 and budget.held == 90  # what fits beside the first
        big = asyncio.create_task(budget.take([80]))
        await asyncio.sleep(0)
        small = asyncio.create_task(budget.take([5]))  # would fit now, but comes after the big one
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        budget.give(60)
        await asyncio.sleep(0)
        assert not big.done() and not small.done()  # 30 + 80 > 100: the big one still waits, first
        budget.give(30)
        assert await big == 1 and await small == 1 and budget.held == 85
        stuck = asyncio.create_task(budget.take([50]))
        await asyncio.sleep(0)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        budget.give(80)
        budget.give(5)
        assert budget.held == 0 and await budget.take([500]) == 1 and budget.peak == 500  # larger: alone

    asyncio.run(main())
