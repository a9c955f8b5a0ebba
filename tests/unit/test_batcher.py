"""The batcher alone, generic over ``run_batch``, here a tiny fake engine: batching, limits,
deadlines, cancellation, drain, and a reload's old/new batchers side by side. No model, no HTTP; each test runs its own event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.pipeline.batch_queue import Batched, BatcherClosed, DeadlineExceeded, QueueFull
from service.pipeline.batcher import Batcher

SIZE = 4


class FakeEngine:
    """Scores each image with its first pixel (so a result shows which image it belongs to),
    records every batch, and can be held at a gate to simulate a busy accelerator."""

    def __init__(self, name: str = "fake", max_batch_size: int = 64, input_size: int = SIZE,
                 delay_s: float = 0.0, gated: bool = False, fail: bool = False) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.manifest = SimpleNamespace(input_size=input_size, version=name)
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = [int(v) for v in images[:, 0, 0, 0]]
        self.batches.append(ids)
        self.started.set()
        if not self.gate.wait(5):
            raise RuntimeError("test gate never opened")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("engine exploded")
        scores = images[:, 0, 0, 0].astype(np.float32)
        maps = np.repeat(scores[:, None, None], images.shape[1], axis=1).repeat(images.shape[2], axis=2)
        return scores, maps

    @property
    def seen(self) -> list[int]:
        return [i for batch in self.batches for i in batch]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.waits: list[float] = []
        self.depths: list[int] = []
        self.rejections: list[str] = []

    def observe_batch(self, category: str, engine: str, size: int, engine_s: float) -> None:
        self.batches.append((engine, size))

    def observe_queue_wait(self, category: str, wait_s: float) -> None:
        self.waits.append(wait_s)

    def set_queue_depth(self, category: str, depth: int) -> None:
        self.depths.append(depth)

    def count_rejection(self, category: str, reason: str) -> None:
        self.rejections.append(reason)


def image(i: int, size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), i, dtype=np.uint8)


def far() -> float:
    return time.monotonic() + 30.0


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def started(engine: FakeEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 5), "engine never started"


@dataclass(frozen=True)
class Scored:
    raw_score: float
    anomaly_map: np.ndarray
    engine: str


def runner(engine: FakeEngine) -> Callable[[list[np.ndarray]], list[Scored]]:
    def run_batch(images: list[np.ndarray]) -> list[Scored]:
        scores, maps = engine.run(np.stack(images))
        return [Scored(float(s), m, engine.name) for s, m in zip(scores, maps)]
    return run_batch


def make(engine: FakeEngine, **kw: Any) -> Batcher:
    """A batcher over ``engine``, its batch limit capped by the engine's (as the runtime does)."""
    kw.setdefault("max_queue_delay_s", 0.05)
    kw["max_batch_size"] = min(kw.get("max_batch_size", 8), engine.max_batch_size)
    return Batcher("cat", runner(engine), label=engine.name, **kw)


async def with_item_0_running(engine: FakeEngine, **kw: Any) -> tuple[Batcher, asyncio.Future[Batched[Scored]]]:
    """A batcher over ``engine`` (gated) with item 0 submitted and running: out of the queue,
    held at the engine's gate until the test opens it."""
    b = make(engine, **kw)
    first = asyncio.ensure_future(b.submit(image(0), far()))
    await started(engine)
    return b, first


async def with_item_0_running_and_1_queued(engine: FakeEngine, **kw: Any,
                                           ) -> tuple[Batcher, list[asyncio.Future[Batched[Scored]]]]:
    """A batcher of one-item batches over ``engine`` (gated), items 0 and 1 submitted at once:
    0 running (held at the gate), 1 queued."""
    b = make(engine, max_batch_size=1, max_queue_delay_s=0.0, **kw)
    futures = b.submit_many([image(0), image(1)], far())
    await started(engine)
    return b, futures


def test_concurrent_items_form_batches_and_results_match() -> None:
    async def t() -> None:
        engine = FakeEngine()
        b = make(engine, max_batch_size=4)
        results: list[Batched[Scored]] = await asyncio.gather(*(b.submit(image(i), far()) for i in range(8)))
        assert engine.sizes == [4, 4]
        assert [r.value.raw_score for r in results] == list(range(8))  # each item gets its own slice
        assert all(r.batch_size == 4 and r.value.engine == "fake" for r in results)
        assert all(float(r.value.anomaly_map[0, 0]) == i for i, r in enumerate(results))
        await b.drain()
    run(t)


def test_max_batch_size_respected() -> None:
    async def t() -> None:
        engine = FakeEngine()
        b = make(engine, max_batch_size=3)
        await asyncio.gather(*(b.submit(image(i), far()) for i in range(10)))
        assert max(engine.sizes) <= 3 and sum(engine.sizes) == 10
        assert sorted(engine.seen) == list(range(10))
        # The engine's own limit (e.g. a TensorRT profile) is respected too.
        small = FakeEngine(max_batch_size=2)
        b2 = make(small, max_batch_size=8)
        await asyncio.gather(*(b2.submit(image(i), far()) for i in range(5)))
        assert max(small.sizes) <= 2
        await b.drain()
        await b2.drain()
    run(t)


def test_delay_respected() -> None:
    async def t() -> None:
        engine = FakeEngine()
        b = make(engine, max_batch_size=8, max_queue_delay_s=0.2)
        t0 = time.monotonic()
        await b.submit(image(1), far())
        waited = time.monotonic() - t0
        assert 0.18 <= waited < 2.0, waited  # a lone item waits for company, but only max_queue_delay
        t0 = time.monotonic()
        await asyncio.gather(*(b.submit(image(i), far()) for i in range(8)))
        assert time.monotonic() - t0 < 0.15  # a full batch leaves at once
        assert engine.sizes == [1, 8]
        await b.drain()
    run(t)


def test_the_window_counts_from_the_first_item_and_each_batch_waits_its_own() -> None:
    """An item that arrives while a batch waits for company rides with it, without moving its
    window; the batch after it waits a whole window of its own (the window's timer, not a
    timeout, ends the wait: a fired timer of one batch must not cut the next one's)."""
    async def t() -> None:
        engine = FakeEngine()
        b = make(engine, max_batch_size=8, max_queue_delay_s=0.3)
        t0 = time.monotonic()
        first = b.submit_many([image(1)], far())
        await asyncio.sleep(0.1)
        second = b.submit_many([image(2)], far())
        await asyncio.gather(*first, *second)
        assert 0.28 <= time.monotonic() - t0 < 0.5  # the first item's window, not the second's
        assert engine.batches == [[1, 2]]
        t1 = time.monotonic()
        await b.submit(image(3), far())
        assert 0.28 <= time.monotonic() - t1 < 2.0  # a window of its own
        assert engine.batches == [[1, 2], [3]]
        await b.drain()
    run(t)


def test_a_drain_sends_the_forming_batch_at_once() -> None:
    async def t() -> None:
        engine = FakeEngine()
        b = make(engine, max_batch_size=8, max_queue_delay_s=5.0)
        futures = b.submit_many([image(1), image(2)], far())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await b.drain()
        assert time.monotonic() - t0 < 1.0 and engine.batches == [[1, 2]]
        assert [f.result().value.raw_score for f in futures] == [1.0, 2.0]
    run(t)


def test_queue_full_raises() -> None:
    async def t() -> None:
        engine = FakeEngine(gated=True)
        obs = RecordingObserver()
        b, running = await with_item_0_running(engine, max_batch_size=1, max_queue_size=2, observer=obs)
        waiting = b.submit_many([image(1), image(2)], far())
        assert b.depth == 2
        with pytest.raises(QueueFull):
            b.submit_many([image(3)], far())
        with pytest.raises(QueueFull):  # all or nothing: nothing of a too-big request is queued
            b.submit_many([image(4), image(5), image(6)], far())
        assert b.depth == 2 and "queue_full" in obs.rejections
        engine.gate.set()
        await running
        await asyncio.gather(*waiting)
        assert engine.seen == [0, 1, 2]
        await b.drain()
    run(t)


def test_expired_items_never_reach_engine() -> None:
    async def t() -> None:
        engine = FakeEngine(gated=True)
        obs = RecordingObserver()
        b, first = await with_item_0_running(engine, max_batch_size=4, max_queue_delay_s=0.0, observer=obs)
        doomed = b.submit_many([image(1)], time.monotonic() + 0.05)
        alive = b.submit_many([image(2)], far())
        await asyncio.sleep(0.1)  # item 1's deadline passes while the engine is busy
        engine.gate.set()
        await first
        with pytest.raises(DeadlineExceeded):
            await doomed[0]
        assert (await alive[0]).value.raw_score == 2
        assert 1 not in engine.seen and engine.seen == [0, 2]
        assert "deadline" in obs.rejections
        await b.drain()
    run(t)


def test_cancelled_items_never_reach_engine() -> None:
    async def t() -> None:
        engine = FakeEngine(gated=True)
        obs = RecordingObserver()
        b, first = await with_item_0_running(engine, max_batch_size=4, max_queue_delay_s=0.0, observer=obs)
        gone = b.submit_many([image(1), image(3)], far())
        kept = b.submit_many([image(2)], far())
        for f in gone:
            f.cancel()  # what the API does when a client disconnects
        engine.gate.set()
        await first
        assert (await kept[0]).value.raw_score == 2
        assert engine.seen == [0, 2]
        assert obs.rejections.count("cancelled") == 2
        await b.drain()
    run(t)


def test_cancelled_items_free_queue_slots() -> None:
    async def t() -> None:
        engine = FakeEngine(gated=True)
        b, first = await with_item_0_running(engine, max_batch_size=1, max_queue_size=1, max_queue_delay_s=0.0)
        (gone,) = b.submit_many([image(1)], far())
        gone.cancel()
        (kept,) = b.submit_many([image(2)], far())  # the cancelled item's slot is reused
        engine.gate.set()
        await first
        assert (await kept).value.raw_score == 2
        await b.drain()
    run(t)


def test_drain_finishes_queued_and_running_work() -> None:
    async def t() -> None:
        engine = FakeEngine(gated=True)
        b = make(engine, max_batch_size=2, max_queue_delay_s=10.0)  # a forming batch would wait 10 s
        futures = b.submit_many([image(i) for i in range(2)], far())
        await started(engine)
        futures += b.submit_many([image(i) for i in range(2, 5)], far())
        t0 = time.monotonic()
        drain = asyncio.ensure_future(b.drain())
        await asyncio.sleep(0.05)
        with pytest.raises(BatcherClosed):  # no new work once draining
            b.submit_many([image(9)], far())
        engine.gate.set()
        await drain
        assert time.monotonic() - t0 < 2.0  # the last, partial batch did not wait its delay
        assert [f.result().value.raw_score for f in futures] == [0, 1, 2, 3, 4]
        assert engine.sizes == [2, 2, 1]
    run(t)


def test_drain_timeout_fails_what_is_left() -> None:
    async def t() -> None:
        engine = FakeEngine(gated=True)
        b, futures = await with_item_0_running_and_1_queued(engine)
        await b.drain(timeout=0.1)
        assert all(isinstance(f.exception(), BatcherClosed) for f in futures)
        engine.gate.set()
    run(t)


def test_cancel_queued_leaves_the_running_batch_to_finish() -> None:
    """The engine process's cancel: items still queued are dropped, an item of the running
    batch is answered when run_batch returns (its payload is in use until then)."""
    async def t() -> None:
        engine = FakeEngine(gated=True)
        b, futures = await with_item_0_running_and_1_queued(engine)
        b.cancel_queued(futures)
        assert not futures[0].done() and futures[1].cancelled()
        engine.gate.set()
        assert (await futures[0]).value.raw_score == 0
        await b.drain()
        assert engine.seen == [0]
    run(t)


def test_a_drain_timeout_with_lent_payloads_answers_the_running_batch_when_it_returns() -> None:
    """The engine process's batchers (payloads are front ends' shared-memory slots): a drain
    that times out fails the queued items at once, never the running ones before run_batch
    has returned, however long that takes."""
    async def t() -> None:
        engine = FakeEngine(gated=True)
        b, futures = await with_item_0_running_and_1_queued(engine, lent_payloads=True)
        await b.drain(timeout=0.1)
        assert not futures[0].done() and isinstance(futures[1].exception(), BatcherClosed)
        engine.gate.set()
        assert (await futures[0]).value.raw_score == 0
        assert engine.seen == [0]
    run(t)


def test_reload_drains_the_old_batcher_while_the_new_takes_requests() -> None:
    """The runtime's reload: one batcher per loaded version; the old one drains (its in-flight
    and queued items finish on the old engine) while new requests go to the new one."""
    async def t() -> None:
        old, new = FakeEngine("old", gated=True), FakeEngine("new")
        b_old = make(old, max_batch_size=2, max_queue_delay_s=0.0)
        first = b_old.submit_many([image(0), image(1)], far())
        await started(old)  # batch 1 runs on the old engine
        queued = b_old.submit_many([image(2)], far())
        b_new = make(new, max_batch_size=2, max_queue_delay_s=0.0)  # the reload
        draining = asyncio.create_task(b_old.drain())
        later = b_new.submit_many([image(3), image(4)], far())
        assert [(await f).value.engine for f in later] == ["new", "new"]  # not held up by the old one
        old.gate.set()
        await draining
        assert [(await f).value.engine for f in [*first, *queued]] == ["old", "old", "old"]
        assert old.seen == [0, 1, 2] and new.seen == [3, 4]
        with pytest.raises(BatcherClosed):
            b_old.submit_many([image(5)], far())
        await b_new.drain()
    run(t)


def test_engine_error_fails_batch_but_worker_survives() -> None:
    async def t() -> None:
        engine = FakeEngine(fail=True)
        b = make(engine, max_batch_size=2, max_queue_delay_s=0.0)
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit(image(0), far())
        engine.fail = False
        assert (await b.submit(image(5), far())).value.raw_score == 5
        await b.drain()
    run(t)


def test_observer_sees_batches_waits_and_depth() -> None:
    async def t() -> None:
        engine = FakeEngine()
        obs = RecordingObserver()
        b = make(engine, max_batch_size=4, observer=obs)
        await asyncio.gather(*(b.submit(image(i), far()) for i in range(4)))
        assert obs.batches == [("fake", 4)]
        assert len(obs.waits) == 4 and all(w >= 0 for w in obs.waits)
        assert max(obs.depths) == 4 and obs.depths[-1] == 0
        await b.drain()
    run(t)


def test_warm_up_items_run_but_are_never_observed() -> None:
    """``observed=False`` (the engine process's warm-ups of each front end): the engine runs
    them like any other item, but no metric sees them: a batch of warm-ups alone is no
    batch there, and one a request rode along in counts the request alone. Counted, each
    front-end start and reload added a batch of 8 images nobody inspected."""
    async def t() -> None:
        engine = FakeEngine()
        obs = RecordingObserver()
        b = make(engine, max_batch_size=8, max_queue_delay_s=0.05, observer=obs)
        warm = b.submit_many([image(i) for i in range(8)], far(), observed=False)
        assert [(await f).value.raw_score for f in warm] == list(range(8))
        assert engine.sizes == [8]
        assert obs.batches == [] and obs.waits == []
        mixed = b.submit_many([image(10), image(11)], far(), observed=False) + b.submit_many([image(12)], far())
        await asyncio.gather(*mixed)
        assert engine.sizes == [8, 3]
        assert obs.batches == [("fake", 1)] and len(obs.waits) == 1
        # Nor are a warm-up's refusals counted.
        doomed = b.submit_many([image(20)], time.monotonic() - 1, observed=False)
        with pytest.raises(DeadlineExceeded):
            await doomed[0]
        assert obs.rejections == []
        await b.drain()
    run(t)
