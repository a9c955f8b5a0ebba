"""A category the store watch retires gives its shared-memory slabs back in multi-process mode:
the front end frees each slab of the category once none of its slots is in flight or lent,
and the engine process drops its mapping of it (``drop_slab``). Before, a retired category's
slabs (up to 28 MiB of address space each at 256 px and 64 slots) stayed mapped in both
processes for the front end's life. A category that comes back gets fresh slabs, under ids
never used before.

In-process: an engine core and a front end's runtime on one event loop (the fixtures of
multiprocess_fixtures.py), so this process's /proc/self/maps holds both sides' mappings; the
store watch is one :meth:`refresh` here.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import fake_version, until
from multiprocess_fixtures import ValueEngine, engine_process, front_end
from service.engine_core import EngineCore
from service.pipeline.engine_images import EngineImages

IMAGE = np.zeros((32, 32, 3), np.uint8)  # fake_version's input size


def mappings(category: str) -> int:
    """This process's mappings of ``category``'s slabs (the front end's and the engine process's)."""
    gc.collect()  # a slab's mapping goes with the last view of it
    with open("/proc/self/maps") as maps:
        return sum(f"msflow-{os.getpid()}-{category}-" in line for line in maps)


def slab_ids(images: EngineImages, category: str) -> set[int]:
    return {ident for key, (ident, _, _) in images.slabs.items() if key[0] == category}


def engine_slab_ids(core: EngineCore) -> set[int]:
    (frontend,) = core.frontends.values()
    return set(frontend.slabs)


def test_a_retired_category_frees_its_slabs_once_its_slots_are_back(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for category in ("aaa", "bbb"):
        fake_version(store, category)
    away = tmp_path / "aaa-away"
    engines: dict[str, ValueEngine] = {}

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        engine = engines[version_dir.parent.name] = ValueEngine(version_dir, 1.0)
        return engine

    async def main() -> None:
        async with engine_process(store, factory, store_removal_grace_s=0) as (core, settings), \
                front_end(settings) as (rt, link):
            # The retired version stays loaded for its unload grace: its batcher must not keep
            # the last batch (views of the slab) meanwhile, or the mapping outlives drop_slab.
            core.unload_grace_s = 600
            images = link.images
            with rt.pin("aaa") as lane, rt.pin("bbb") as neighbour:
                lent = lane.batcher.submit_many([IMAGE], time.monotonic() + 30, lend=True)
                await asyncio.gather(*lent)  # answered: its slot is lent until released
                engines["aaa"].gate.clear()
                engines["aaa"].started.clear()
                running = lane.batcher.submit_many([IMAGE], time.monotonic() + 30)
                await asyncio.gather(*neighbour.batcher.submit_many([IMAGE], time.monotonic() + 30))
            assert await asyncio.to_thread(engines["aaa"].started.wait, 10)
            old = slab_ids(images, "aaa")
            assert len(old) == 2  # its requests' and its warm-up's
            await until(lambda: old <= engine_slab_ids(core), "the engine process mapping aaa's slabs")
            assert mappings("aaa") == 4  # each slab in each process

            shutil.move(store / "aaa", away)
            await rt.registry.refresh()  # the store watch retires aaa
            assert "aaa" not in rt.registry.categories
            # The warm-up slab had nothing in flight: freed now. The requests' slab has an image
            # running and one lent: kept.
            assert images.slabs.keys() & {("aaa", 32)} and len(slab_ids(images, "aaa")) == 1
            engines["aaa"].gate.set()
            await asyncio.gather(*running)
            assert len(slab_ids(images, "aaa")) == 1, "freed with a slot still lent"
            assert lane.batcher.release(lent)
            del lent
            assert slab_ids(images, "aaa") == set()
            await until(lambda: not old & engine_slab_ids(core), "the engine process dropping aaa's slabs")
            del lane, running  # the test's own views of the slots
            await until(lambda: mappings("aaa") == 0, "aaa's slabs unmapped in both processes")
            assert len(slab_ids(images, "bbb")) == 2 and mappings("bbb") == 4  # the neighbour's stay

            shutil.move(away, store / "aaa")
            await rt.registry.refresh()  # back: loaded and warmed again
            with rt.pin("aaa") as lane:
                (done,) = await asyncio.gather(*lane.batcher.submit_many([IMAGE], time.monotonic() + 30))
            assert done.value[0] == 1.0
            fresh = slab_ids(images, "aaa")
            assert len(fresh) == 2 and not fresh & (old | slab_ids(images, "bbb")), "a slab id used again"
            assert fresh <= engine_slab_ids(core)

    asyncio.run(main())
