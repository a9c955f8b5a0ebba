"""Which model versions a front end holds in the engine process across reloads, in-process
(an engine core and a front end's runtime on one event loop): a reload whose warm-up fails
keeps the served version held, reloading the served version holds it once, and a folder
replaced under its number is another entry, the old one held by who still serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import fake_version, until
from multiprocess_fixtures import ValueEngine, engine_process, front_end
from service.config import Settings
from service.engine_core import EngineCore
from service.engines.base import EngineError
from service.pipeline.engine_client import EngineClient
from service.pipeline.runtime import PipelineRuntime


@contextlib.asynccontextmanager
async def front_end_of(core: EngineCore, settings: Settings) -> AsyncIterator[tuple[PipelineRuntime, int]]:
    """A front end's runtime linked to ``core`` with the store's models loaded: the runtime,
    and the front end's number in the engine process; closed afterwards."""
    rt = PipelineRuntime(settings, None, engine_link=EngineClient(settings, settings.engine_socket))
    rt.open()
    try:
        await rt.registry.load_all()
        (ident,) = core.frontends
        yield rt, ident
    finally:
        await rt.close()


def test_a_reload_whose_warm_up_fails_keeps_the_version_served_held(tmp_path: Path) -> None:
    """The registry keeps serving version 1 when version 2's warm-up through the engine
    process fails: this front end must still hold 1 there (not let go of it at 2's acquire),
    and let go of 2, which the engine process then unloads."""
    store = tmp_path / "store"
    v1 = fake_version(store, "aaa", "1")

    def factory(version_dir: Path, **_: Any) -> ValueEngine:
        return ValueEngine(version_dir, 0.0, failing=version_dir.name == "2")

    async def main() -> None:
        async with engine_process(store, factory, request_deadline_ms=500) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end_of(core, settings) as (rt, ident):
                v2 = fake_version(store, "aaa", "2")
                with pytest.raises(EngineError):
                    await rt.registry.reload("aaa")
                assert rt.registry.serving() == {"aaa": "1"}
                await until(lambda: str(v2) not in core.hosted, "version 2 unloaded")
                await asyncio.sleep(0.3)  # past the grace period
                assert str(v1) in core.hosted and set(core.hosted[str(v1)].holders) == {ident}
                with rt.pin("aaa") as lane:
                    (future,) = lane.batcher.submit_many([np.zeros((32, 32, 3), np.uint8)], time.monotonic() + 10)
                    assert (await asyncio.wait_for(future, 10)).batch_size == 1

    asyncio.run(main())


def test_reloading_the_version_served_holds_it_once(tmp_path: Path) -> None:
    """A reload of the version already served (an operator's reload with nothing new, or one
    followed from another front end) acquires it again: once the next version serves, the
    engine process must still unload it."""
    store = tmp_path / "store"
    v1 = fake_version(store, "aaa", "1")

    async def main() -> None:
        async with engine_process(store, request_deadline_ms=500) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end_of(core, settings) as (rt, ident):
                await rt.registry.reload("aaa")
                await rt.registry.reload("aaa", "1")
                await asyncio.sleep(0.3)  # past the grace period: still held
                assert set(core.hosted[str(v1)].holders) == {ident}
                v2 = fake_version(store, "aaa", "2")
                await rt.registry.reload("aaa")
                await until(lambda: str(v1) not in core.hosted, "version 1 unloaded")
                assert list(core.hosted) == [str(v2)] and set(core.hosted[str(v2)].holders) == {ident}

    asyncio.run(main())


def test_a_folder_replaced_under_its_number_is_a_new_entry_and_the_old_one_goes_with_its_last_holder(
        tmp_path: Path) -> None:
    """``aaa/1`` replaced by another model under the same number (exported again): a front end
    whose watch finds it gets the new content from the engine process (before, the engine
    hosted under that path, so it served the old one on for good), while the other front end,
    not yet on it, keeps the old entry and runs on it; once both moved, the old one unloads."""
    store = tmp_path / "store"
    v1 = fake_version(store, "aaa", "1", size=32)

    async def main() -> None:
        async with engine_process(store, request_deadline_ms=500) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end(settings) as (a, _), front_end(settings) as (b, _):
                a_ident, b_ident = sorted(core.frontends)
                (old,) = core.engines.handles.values()
                shutil.rmtree(v1)
                fake_version(store, "aaa", "1", size=48)
                assert await a.registry.refresh() == ["aaa"]
                assert a.registry.get("aaa").manifest.input_size == 48
                new = core.hosted[str(v1)]
                assert new is not old and new.engine.manifest.input_size == 48 and new.holders == {a_ident}
                await until(lambda: old.holders == {b_ident}, "a's release of the old entry")
                await asyncio.sleep(0.3)  # past the grace period: b still holds it
                assert list(core.engines.handles.values()) == [old, new]
                with b.pin("aaa") as lane:  # b's requests still run on what it serves
                    (future,) = lane.batcher.submit_many([np.zeros((32, 32, 3), np.uint8)], time.monotonic() + 10)
                    assert (await asyncio.wait_for(future, 10)).batch_size == 1
                assert await b.registry.refresh() == ["aaa"] and await a.registry.refresh() == []
                assert b.registry.get("aaa").manifest.input_size == 48 and new.holders == {a_ident, b_ident}
                await until(lambda: list(core.engines.handles.values()) == [new], "the old entry unloaded")
                assert core.hosted == {str(v1): new}

    asyncio.run(main())
