"""A front end's shared-memory slots while the engine process still writes into them, in-process
(an engine core and a front end's link on one event loop, a gated :class:`ValueEngine`): a
cancelled image and a channel that ends under a running batch never hand its slots out again
before the batch is done; and each category's slots are its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import fake_version, until
from multiprocess_fixtures import ValueEngine, engine_process
from service.pipeline.batch_queue import QueueFull
from service.pipeline.engine_client import EngineClient, EngineUnavailable


def two_categories(store: Path) -> tuple[dict[str, Path], dict[str, ValueEngine], Callable[..., ValueEngine]]:
    """Versions of ``aaa`` (maps of 1.0, its batches held at a gate) and ``bbb`` (2.0) at one
    input size, and the engine factory that makes (and records) each one's engine."""
    dirs = {"aaa": fake_version(store, "aaa"), "bbb": fake_version(store, "bbb")}
    engines: dict[str, ValueEngine] = {}

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        category = version_dir.parent.name
        engines[category] = ValueEngine(version_dir, 1.0 if category == "aaa" else 2.0, gated=category == "aaa")
        return engines[category]
    return dirs, engines, factory


def test_a_cancelled_image_keeps_its_slot_until_its_running_batch_is_done(tmp_path: Path) -> None:
    """A front end frees an image's slot on the engine process's answer. A cancel (deadline,
    client gone) reaching an image whose batch runs must not be answered before the batch
    ends: the slot would go to another request while the engine still writes the old map
    into it."""
    store = tmp_path / "store"
    dirs, engines, factory = two_categories(store)

    async def main() -> None:
        async with engine_process(store, factory) as (core, settings):
            client = EngineClient(settings, settings.engine_socket)
            client.start()
            try:
                holds = {category: (await client.acquire(version_dir))[0] for category, version_dir in dirs.items()}
                pool = client.pool("aaa", 32)
                image = np.zeros((32, 32, 3), np.uint8)
                (a,) = client.submit("aaa", holds["aaa"], [image], time.monotonic() + 30)
                assert await asyncio.to_thread(engines["aaa"].started.wait, 10)  # A's batch is in the engine
                a.cancel()
                await asyncio.sleep(0.3)  # time for a (wrong) answer to come back
                assert pool.free == pool.capacity - 1, "A's slot was freed while its batch still runs"
                (b,) = client.submit("bbb", holds["bbb"], [image], time.monotonic() + 30)
                done = await asyncio.wait_for(b, 10)
                assert done.value[0] == 2.0 and (done.value[1] == 2.0).all()
                engines["aaa"].gate.set()
                await until(lambda: pool.free == pool.capacity, "A's slot back once its batch is done")
                assert a.cancelled()
            finally:
                engines["aaa"].gate.set()
                await client.close()

    asyncio.run(main())


def test_a_channel_that_ends_under_a_running_batch_never_hands_its_slots_out_again(tmp_path: Path) -> None:
    """The channel can end while the engine process lives on (here it drops the front end,
    as for a corrupt stream): its batch still running writes into the front end's slab. The
    front end fails the request, reconnects and serves on; the slots that were in flight
    are on a new slab, not in memory the old batch writes."""
    store = tmp_path / "store"
    version_dir = fake_version(store, "aaa")
    engines: list[ValueEngine] = []

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        engines.append(ValueEngine(version_dir, 1.0, gated=True))
        return engines[-1]

    async def main() -> None:
        async with engine_process(store, factory) as (core, settings):
            client = EngineClient(settings, settings.engine_socket)
            client.start()
            try:
                hold, _ = await client.acquire(version_dir)
                pool = client.pool("aaa", 32)
                image = np.zeros((32, 32, 3), np.uint8)
                (a,) = client.submit("aaa", hold, [image], time.monotonic() + 30)
                (slot,) = client.images.requests[max(client.images.requests)].slots
                written = client.images.slabs[("aaa", 32)][1]  # the memory A's batch writes its map into
                assert await asyncio.to_thread(engines[0].started.wait, 10)
                (frontend,) = core.frontends.values()
                frontend.channel.close()
                with pytest.raises(EngineUnavailable):
                    await asyncio.wait_for(a, 10)
                await until(lambda: client.connected, "the reconnect")
                assert pool.free == pool.capacity
                engines[0].gate.set()
                await until(lambda: (written.output(slot) == 1.0).all(), "A's late map")
                serving = client.images.slabs[("aaa", 32)][1]
                assert serving is not written and (serving.output(slot) == 0).all()
                (b,) = client.submit("aaa", hold, [image], time.monotonic() + 30)  # the new slab reached the engine
                assert (await asyncio.wait_for(b, 10)).value[0] == 1.0
            finally:
                engines[0].gate.set()
                await client.close()

    asyncio.run(main())


def test_a_category_whose_slots_are_all_held_leaves_its_neighbours_theirs(tmp_path: Path) -> None:
    """``max_queue_size`` slots per category: ``aaa``'s four images, held in a running batch,
    leave it no room, and ``bbb`` (the same input size) is served from slots of its own. With
    one pool per input size its submit was refused ``QueueFull``."""
    store = tmp_path / "store"
    dirs, engines, factory = two_categories(store)

    async def main() -> None:
        async with engine_process(store, factory) as (_, settings):
            assert settings.max_queue_size == 4
            client = EngineClient(settings, settings.engine_socket)
            client.start()
            try:
                holds = {category: (await client.acquire(version_dir))[0] for category, version_dir in dirs.items()}
                image = np.zeros((32, 32, 3), np.uint8)
                held = client.submit("aaa", holds["aaa"], [image] * 4, time.monotonic() + 30)
                assert await asyncio.to_thread(engines["aaa"].started.wait, 10)
                with pytest.raises(QueueFull):
                    client.submit("aaa", holds["aaa"], [image], time.monotonic() + 30)
                (b,) = client.submit("bbb", holds["bbb"], [image], time.monotonic() + 30)
                assert (await asyncio.wait_for(b, 10)).value[0] == 2.0
                engines["aaa"].gate.set()
                assert [done.value[0] for done in await asyncio.gather(*held)] == [1.0] * 4
                pools = [client.pool(category, 32) for category in dirs]
                assert [(pool.free, pool.capacity) for pool in pools] == [(4, 4), (4, 4)]
            finally:
                engines["aaa"].gate.set()
                await client.close()

    asyncio.run(main())
