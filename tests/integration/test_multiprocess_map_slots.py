"""A front end reads each anomaly map in its shared-memory slot (no copy) and holds the slot
until the map's last reader is done, in-process (an engine core and a front end's runtime on
one event loop, :class:`ValueEngine`). Whatever ends a request (an answer, a client gone, a
deadline, an error in postprocess, an engine process replaced under it) its slots all come
back: one kept would shrink the front end's queue for good. A review capture keeps a copy.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness import fake_version, until
from multiprocess_fixtures import ValueEngine, engine_process, front_end
from service.engine_core import EngineCore
from service.pipeline.engine_images import EngineImages
from service.pipeline.batch_queue import CallerGone, DeadlineExceeded
from service.pipeline.engine_errors import EngineUnavailable
from service.pipeline.item import InspectedImage
from service.pipeline.postprocess import NonFiniteOutput
from service.pipeline.runtime import PipelineRuntime
from service.schemas import HeatmapLink, HeatmapMode, InspectOptions, Upload

SIZE = 32  # fake_version's input size
URL = InspectOptions(heatmap=HeatmapMode.url)


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(out, "PNG")
    return out.getvalue()


PNG = _png()


def records(count: int = 1) -> list[InspectedImage]:
    return [InspectedImage.received(i, Upload(filename=f"{i}.png", data=PNG)) for i in range(count)]


class NaNMapEngine(ValueEngine):
    """A finite score with a map of NaN once warm: refused in the postprocess, which finds it."""

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        warm = self._warm
        scores, maps = super().run(images)
        if warm:
            maps[:] = np.nan
        return scores, maps


class HeldLinks:
    """The runtime's link store behind a gate: a ``heatmap=url`` postprocess waits at ``put``
    (a slow Redis) until ``gate`` opens, then stores through the real one, or raises ``error``."""

    def __init__(self, real: Any) -> None:
        self.real, self.reached, self.gate = real, asyncio.Event(), asyncio.Event()
        self.error: Exception | None = None

    async def put(self, png: bytes, width: int, height: int,
                  deadline: float | None = None) -> tuple[HeatmapLink, bool]:
        self.reached.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return await self.real.put(png, width, height, deadline)


def factory_of(engines: dict[str, ValueEngine]) -> Callable[..., ValueEngine]:
    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        category = version_dir.parent.name
        engine = {"aaa": lambda: ValueEngine(version_dir, 1.0), "bbb": lambda: ValueEngine(version_dir, 2.0),
                  "held": lambda: ValueEngine(version_dir, 3.0),  # held by hold() once warm
                  "nan": lambda: NaNMapEngine(version_dir, 1.0)}[category]()
        engines[category] = engine
        return engine
    return factory


class AllSlots:
    """Every slot of a front end, each category's pool counted (a slot kept by any one of
    them shows as one fewer free)."""

    def __init__(self, images: EngineImages) -> None:
        self.images = images

    @property
    def free(self) -> int:
        return sum(pool.free for _, _, pool in self.images.slabs.values())

    @property
    def capacity(self) -> int:
        return sum(pool.capacity for _, _, pool in self.images.slabs.values())


@asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[EngineCore, PipelineRuntime, AllSlots,
                                                                           HeldLinks, dict[str, ValueEngine]]]:
    """An engine process and one front end serving four categories (four slots of 32² each)."""
    store = tmp_path / "store"
    for category in ("aaa", "bbb", "held", "nan"):
        fake_version(store, category)
    engines: dict[str, ValueEngine] = {}
    async with engine_process(store, factory_of(engines), **overrides) as (core, settings):
        async with front_end(settings) as (rt, link):
            links = HeldLinks(rt.links)
            rt.links = links  # type: ignore[assignment]
            try:
                yield core, rt, AllSlots(link.images), links, engines
            finally:
                links.gate.set()
                for engine in engines.values():
                    engine.gate.set()


def hold(engine: ValueEngine) -> None:
    """Its next batch waits at its gate (the front end's warm-up went through it ungated)."""
    engine.gate.clear()
    engine.started.clear()


async def inspect(rt: PipelineRuntime, category: str, items: list[InspectedImage],
                  options: InspectOptions = InspectOptions(), deadline_s: float = 30.0, **kwargs: Any) -> None:
    with rt.pin(category) as lane:
        await rt.run(lane, items, options, time.monotonic() + deadline_s, time.monotonic(), **kwargs)


def test_maps_are_read_in_their_slots_and_every_slot_comes_back_after_answers(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, rt, pool, _links, _):
            in_place: list[bool] = []
            postprocess = rt.postprocess

            async def reading(lane: Any, items: Any, *args: Any, **kwargs: Any) -> None:
                # Read here: a category's request slab is made with its first lane, after the warm-up.
                slabs = [slab for _, slab, _ in rt.engine_link.images.slabs.values()]  # type: ignore[union-attr]
                in_place.extend(any(np.shares_memory(item.score_map, slab.output(slot))
                                    for slab in slabs for slot in range(slab.layout.slots)) for item in items)
                await postprocess(lane, items, *args, **kwargs)
            rt.postprocess = reading  # type: ignore[method-assign]
            answered = [records(2) for _ in range(6)]  # 12 images through 2 x 4 slots, two requests at a time
            for at in range(0, 6, 2):
                await asyncio.gather(*(inspect(rt, "aaa" if i % 2 else "bbb", answered[i]) for i in (at, at + 1)))
            assert in_place == [True] * 12, "a map copied out of its slot"
            assert pool.free == pool.capacity
            for i, items in enumerate(answered):
                assert [item.answer.raw_score for item in items] == [1.0 if i % 2 else 2.0] * 2
                assert all(item.anomaly_map is None for item in items)  # no view of a reused slot left

    asyncio.run(main())


def test_a_client_gone_before_its_answer_leaves_no_slot_held(tmp_path: Path) -> None:
    """The batch runs when the client leaves: the cancel cannot drop it, its answer (ok) comes
    after the caller stopped waiting, and its slot must come back with it."""
    async def main() -> None:
        async with serving(tmp_path) as (_, rt, pool, _links, engines):
            left = asyncio.get_running_loop().create_future()
            hold(engines["held"])
            request = asyncio.create_task(inspect(rt, "held", records(), gone=left))
            await until(engines["held"].started.is_set, "the batch in the engine")
            left.set_result(None)
            with pytest.raises(CallerGone):
                await request
            engines["held"].gate.set()
            await until(lambda: pool.free == pool.capacity, "the slot back with the late answer")
            await asyncio.sleep(0.1)
            assert pool.free == pool.capacity

    asyncio.run(main())


def test_a_deadline_or_a_cancel_in_postprocess_gives_the_slots_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, rt, pool, links, _):
            with pytest.raises(DeadlineExceeded):  # the API's 504
                await inspect(rt, "aaa", records(2), URL, deadline_s=0.5)
            assert links.reached.is_set() and pool.free == pool.capacity
            links.reached.clear()
            request = asyncio.create_task(inspect(rt, "aaa", records(2), URL))
            await links.reached.wait()
            assert pool.free == pool.capacity - 2  # held while the postprocess reads the maps
            request.cancel()  # the request's task ended from outside (a server shutting down)
            with pytest.raises(asyncio.CancelledError):
                await request
            assert pool.free == pool.capacity

    asyncio.run(main())


def test_an_error_in_postprocess_gives_the_slots_back(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (_, rt, pool, links, _):
            links.error, links.gate = OSError("link store down"), asyncio.Event()
            links.gate.set()
            with pytest.raises(OSError):
                await inspect(rt, "aaa", records(2), URL)
            assert pool.free == pool.capacity
            with pytest.raises(NonFiniteOutput):  # a map of NaN, found by the postprocess
                await inspect(rt, "nan", records(3))
            assert pool.free == pool.capacity

    asyncio.run(main())


def test_a_review_capture_keeps_its_own_copy_of_the_map(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, review_audit_rate=1.0, review_store=tmp_path / "review") as (_, rt, pool, _l, _):
            captured = records()
            await inspect(rt, "aaa", captured)
            kept = rt.review._queue[-1].item  # queued; the writer runs on the loop's next turn
            assert kept.anomaly_map is not None and pool.free == pool.capacity
            slab = rt.engine_link.images.slabs[("aaa", SIZE)][1]  # type: ignore[union-attr]
            for slot in range(slab.layout.slots):  # as the engine process writes the next maps of aaa's slots
                slab.output(slot)[...] = 2.0
            assert (kept.anomaly_map == 1.0).all(), "the capture's map changed with its slot"
            await until(lambda: not rt.review._queue and rt.review._in_hand is None, "the captures written")
            assert len(rt.review.store.scan("aaa").pending) == 1 and pool.free == pool.capacity

    asyncio.run(main())


def test_an_engine_process_replaced_under_a_request_leaves_no_slot_held(tmp_path: Path) -> None:
    """One request is in postprocess (its maps read in their slots), another in the engine,
    when the link to the engine process ends: the second fails 503 (its slab is replaced, the
    batch still writing into it), the first is answered from its slots in the old slab, and
    once a new engine process serves, every slot is free and serves again."""
    async def main() -> None:
        async with serving(tmp_path) as (core, rt, pool, links, engines):
            first = records(2)
            reading = asyncio.create_task(inspect(rt, "aaa", first, URL))
            await links.reached.wait()
            hold(engines["held"])
            running = asyncio.create_task(inspect(rt, "held", records()))
            await until(engines["held"].started.is_set, "the batch in the engine")
            sock = rt.settings.engine_socket
            assert sock is not None
            for frontend in list(core.frontends.values()):
                frontend.channel.close()  # the link ends at once, as with a killed engine process
            core.stop()
            with pytest.raises(EngineUnavailable):
                await running
            assert pool.free == pool.capacity - 2  # the first request's maps are still read
            engines["held"].gate.set()  # the old engine process drains and goes
            await until(lambda: not sock.exists(), "the old engine process gone")
            new_core = EngineCore(core.settings, engine_factory=factory_of(engines))
            served = asyncio.create_task(new_core.serve(sock))
            try:
                links.gate.set()
                await reading
                assert pool.free == pool.capacity
                assert [item.answer.raw_score for item in first] == [1.0] * 2
                await until(lambda: rt.engine_link.connected, "the front end reconnected")  # type: ignore[union-attr]
                await until(lambda: rt.registry.serving().get("aaa") == "1", "aaa served again")
                items = records(4)
                await inspect(rt, "aaa", items)
                assert [item.answer.raw_score for item in items] == [1.0] * 4 and pool.free == pool.capacity
            finally:
                new_core.stop()
                await served

    asyncio.run(main())
