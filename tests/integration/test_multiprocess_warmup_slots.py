"""A reload's warm-up in a front end of a multi-process server while its category's requests
hold every slot: the warm-up goes through the engine process on slots of its own
(service/pipeline/engine_images.py), so the reload succeeds and the requests keep theirs.
Before, the warm-up took the category's request slots and was refused ``QueueFull`` at once:
the operator's reload (or a new version the store watch found) failed under the flood.

In-process: an engine core and a front end's runtime on one event loop (the fixtures of
multiprocess_fixtures.py), :class:`ValueEngine` scoring each version's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import fake_version, serves, until
from multiprocess_fixtures import ValueEngine, engine_process, front_end, operator_reload
from service.config import Settings
from service.engine_core import EngineCore

IMAGE = np.zeros((32, 32, 3), np.uint8)  # fake_version's input size


def factory_of(engines: dict[str, ValueEngine], max_batch_size: int = 4) -> Any:
    """Each version's engine scores its version number; recorded by version."""
    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        engine = engines[version_dir.name] = ValueEngine(version_dir, float(version_dir.name))
        engine.max_batch_size = max_batch_size
        return engine
    return factory


def test_a_reload_warms_up_while_its_category_holds_every_slot(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, "aaa", "1")
    engines: dict[str, ValueEngine] = {}

    async def main() -> None:
        async with engine_process(store, factory_of(engines)) as (_, settings), \
                front_end(settings) as (rt, link):
            engine = engines["1"]
            engine.gate.clear()  # its next batch (the front end warmed it already) waits at the gate
            with rt.pin("aaa") as lane:
                held = lane.batcher.submit_many([IMAGE] * settings.max_queue_size, time.monotonic() + 30)
            try:
                assert await asyncio.to_thread(engine.started.wait, 10)
                requests = link.pool("aaa", 32)
                assert requests.free == 0  # the category's every slot is held by its requests
                fake_version(store, "aaa", "2")
                await operator_reload(rt, link, "aaa", "2")  # before: QueueFull from the warm-up
                assert serves(rt.registry) == ("2", True)
                assert requests.free == 0  # the warm-up took none of the requests' slots
            finally:
                engine.gate.set()
            assert [done.value[0] for done in await asyncio.gather(*held)] == [1.0] * settings.max_queue_size
            assert requests.free == requests.capacity

    asyncio.run(main())


def batching_window(store: Path, factory: Any) -> contextlib.AbstractAsyncContextManager[tuple[EngineCore, Settings]]:
    """An engine process whose batches of 8 never fill from a front end's 4 slots: each
    request waits out a 1.5 s batching window in its queue (which holds 4 images a front end)."""
    return engine_process(store, factory, max_batch_size=8, max_queue_delay_ms=1500)


def test_a_reload_of_the_served_version_warms_up_while_its_requests_fill_the_engine_queue(tmp_path: Path) -> None:
    """The same version reloaded: its warm-up joins the batcher its requests wait in, in the
    engine process, whose queue (``max_queue_size`` a front end) they fill while the batching
    window runs. The warm-up's images are room of their own there too."""
    store = tmp_path / "store"
    fake_version(store, "aaa", "1")
    engines: dict[str, ValueEngine] = {}

    async def main() -> None:
        async with batching_window(store, factory_of(engines, max_batch_size=8)) as (core, settings), \
                front_end(settings) as (rt, link):
            with rt.pin("aaa") as lane:
                held = lane.batcher.submit_many([IMAGE] * settings.max_queue_size, time.monotonic() + 30)
            (hosted,) = core.hosted.values()
            await until(lambda: len(hosted.batcher._pending) == settings.max_queue_size, "requests in the window")
            await operator_reload(rt, link, "aaa", "1")  # before: QueueFull, in the front end or the engine process
            assert [done.value[0] for done in await asyncio.gather(*held)] == [1.0] * settings.max_queue_size

    asyncio.run(main())


def test_warm_ups_of_one_category_wait_for_each_others_slots(tmp_path: Path) -> None:
    """Two warm-ups of one category at once (a reload and a follow, say), each as large as
    the warm-up slab: the second waits for the first's slots, it is not refused."""
    store = tmp_path / "store"
    fake_version(store, "aaa", "1")
    engines: dict[str, ValueEngine] = {}

    async def main() -> None:
        async with engine_process(store, factory_of(engines)) as (_, settings), \
                front_end(settings) as (rt, link):
            engine = engines["1"]
            engine.gate.clear()
            batch = np.zeros((settings.max_batch_size, 32, 32, 3), np.uint8)
            hold = rt.registry.get("aaa").engine.hold  # the engine process's entry of the folder it serves
            first = asyncio.create_task(link.run("aaa", hold, batch))
            assert await asyncio.to_thread(engine.started.wait, 10)
            second = asyncio.create_task(link.run("aaa", hold, batch))
            await asyncio.sleep(0.2)
            assert not second.done()  # waiting for the slots, not refused
            engine.gate.set()
            for done in await asyncio.gather(first, second):
                assert (done[0] == 1.0).all()

    asyncio.run(main())
