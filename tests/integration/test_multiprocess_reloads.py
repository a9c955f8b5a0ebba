"""An operator's reload in multi-process mode holds for every front end, also those that were
not there to hear it: a killed front end's replacement (which loads the newest version at
start) and a front end cut off from the engine process while it was relayed.

In-process: an engine core and front ends' runtimes on one event loop (the fixtures of
multiprocess_fixtures.py), each front end following reloads as a server's does
(:meth:`service.pipeline.state.ServiceState._follow_reload`).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from harness import fake_version, serves, until
from multiprocess_fixtures import RecordedState, engine_process, front_end, operator_reload, pinned_to_version_1, started_state
from service.engine_core import EngineCore
from service.pipeline.registry_errors import ModelNotLoaded


def test_a_front_end_started_after_a_pinning_reload_serves_the_pinned_version(two_version_store: Path) -> None:
    """Before, a replacement front end loaded the newest version and the server answered with
    two versions at once (the one an operator rolled back from on ~half the connections)."""
    store = two_version_store

    async def main() -> None:
        async with engine_process(store) as (core, settings):
            async with front_end(settings) as (first, first_link):
                assert serves(first.registry) == ("2", False)
                await operator_reload(first, first_link, "aaa", "1")
                assert serves(first.registry) == ("1", True)
                async with front_end(settings) as (late, _):  # started after the reload
                    await until(lambda: serves(late.registry) == ("1", True), "the late front end on the pinned version")
                    # Unpinned on the late one: the first follows, once.
                    await operator_reload(late, _, "aaa", None)
                    await until(lambda: serves(first.registry) == ("2", False), "the first front end back on the newest")
                    await asyncio.sleep(0.2)
                    assert serves(late.registry) == ("2", False) and serves(first.registry) == ("2", False)
                # A front end starting after the unpin needs no reload at all: it serves the newest.
                async with front_end(settings) as (third, third_link):
                    await asyncio.sleep(0.2)
                    assert serves(third.registry) == ("2", False)
                    assert third_link.reloads.record.latest["aaa"][1] is None

    asyncio.run(main())


def test_a_reload_made_while_the_engine_process_was_away_reaches_the_others(two_version_store: Path) -> None:
    """A new engine process knows no reload: the front ends hand over theirs at the handshake,
    the newest wins, and a front end that missed it (cut off) follows."""
    store = two_version_store

    async def main() -> None:
        async with engine_process(store) as (core, settings):
            async with front_end(settings) as (a, a_link), front_end(settings) as (b, _):
                await operator_reload(a, a_link, "aaa", "1")
                await until(lambda: serves(b.registry) == ("1", True), "b following the pin")
                # The engine process forgets (a new one); the record comes back from the front ends.
                core.reloads.clear()
                for frontend in list(core.frontends.values()):
                    frontend.channel.close()
                await until(lambda: len(core.frontends) == 2 and a_link.connected, "both front ends back")
                await until(lambda: "aaa" in core.reloads, "the pin handed over again")
                assert core.reloads["aaa"]["version"] == "1"
                async with front_end(settings) as (late, _):
                    await until(lambda: serves(late.registry) == ("1", True), "a later front end on the pinned version")
        assert isinstance(core, EngineCore)

    asyncio.run(main())


def test_a_replacement_front_end_never_serves_the_version_an_operator_rolled_back_from(two_version_store: Path) -> None:
    """uvicorn listens once ``ServiceState.start`` returns. Before, start loaded and served the
    newest version and the engine process's replay of the pin was followed after it: a killed
    front end's replacement answered with the newest version for its warm-up (0.26 s; 2 of 97
    answers under load in a real server). Now start follows the replayed pins first and loads
    only what they leave: version 2 is never served, nor loaded."""
    store = two_version_store
    fake_version(store, "bbb", "1")

    async def main() -> None:
        async with pinned_to_version_1(store, unload_grace_s=0.1) as (core, settings, _, _):
            await until(lambda: str(store / "aaa" / "2") not in core.hosted, "version 2 unloaded")
            async with started_state(settings) as replacement:
                assert serves(replacement.registry) == ("1", True)  # from its first answer on
                assert replacement.swapped_in == ["1", "1"]  # aaa pinned, then bbb: never aaa 2
                assert replacement.registry.get("bbb").version == "1"  # the unpinned still load
                assert str(store / "aaa" / "2") not in core.hosted

    asyncio.run(main())


def test_a_front_end_starting_during_a_pinning_reload_listens_on_the_pinned_version(two_version_store: Path) -> None:
    """The reload relayed while the front end loads (its load_all building version 2) is
    followed before its start returns (before, it listened on version 2 and followed a
    warm-up later)."""
    store = two_version_store

    async def main() -> None:
        async with engine_process(store) as (core, settings):
            async with front_end(settings) as (first, first_link):
                starting = RecordedState(settings)
                build = starting.registry._build
                loading = asyncio.Event()
                loop = asyncio.get_running_loop()

                def slow_build(*args: Any, **kwargs: Any) -> Any:  # a big model's load (a worker thread)
                    loop.call_soon_threadsafe(loading.set)
                    time.sleep(0.5)
                    return build(*args, **kwargs)
                starting.registry._build = slow_build  # type: ignore[method-assign]
                start = asyncio.create_task(starting.start())
                await loading.wait()
                await operator_reload(first, first_link, "aaa", "1")
                await start
                try:
                    assert serves(starting.registry) == ("1", True)
                finally:
                    await starting.stop()

    asyncio.run(main())


def test_a_replacement_front_end_serves_a_pinned_version_removed_from_the_store_from_the_engine_process(
        two_version_store: Path) -> None:
    """An operator pinned version 1, then its folder left the store (a cleanup script): the
    running front ends serve it on from memory, as one process does. Before, a killed front
    end's replacement could not follow the pin (it read the manifest from the folder), loaded
    version 2 and the server answered with both versions. Now the engine process, which still
    holds version 1, hands over its manifest with the acquire and the replacement serves 1."""
    store = two_version_store

    async def main() -> None:
        async with pinned_to_version_1(store, unload_grace_s=0.1) as (core, settings, first, _):
            await until(lambda: str(store / "aaa" / "2") not in core.hosted, "version 2 unloaded")
            shutil.rmtree(store / "aaa" / "1")
            async with started_state(settings) as replacement:
                assert serves(replacement.registry) == ("1", True)
                assert replacement.swapped_in == ["1"]  # never version 2
                assert replacement.registry.failed == {}
                assert replacement.registry.get("aaa").manifest.version == "1"
                await replacement.registry.refresh()  # the store watch leaves the pin alone
                assert serves(replacement.registry) == ("1", True) and serves(first.registry) == ("1", True)
                assert str(store / "aaa" / "2") not in core.hosted

    asyncio.run(main())


def test_a_pinned_version_removed_from_the_store_and_held_nowhere_fails_its_category_not_the_newest(
        two_version_store: Path) -> None:
    """Nothing holds version 1 any more (its last front end went, the engine process unloaded
    it): a front end starting cannot serve the pin, and serves nothing for the category (503
    model_not_loaded, the reason naming the removed version) rather than version 2, which the
    store watch does not load either, until an operator's reload clears the pin."""
    store = two_version_store
    fake_version(store, "bbb", "1")

    async def main() -> None:
        async with engine_process(store) as (core, settings):
            core.unload_grace_s = 0.05
            async with front_end(settings) as (first, first_link):
                await operator_reload(first, first_link, "aaa", "1")
            await until(lambda: not core.hosted, "every version unloaded")
            shutil.rmtree(store / "aaa" / "1")
            async with started_state(settings) as late:
                assert "aaa" not in late.registry.serving() and "2" not in late.swapped_in
                why = late.registry.failed["aaa"]
                assert "version 1" in why and "removed" in why, why
                assert str(store) not in why  # no server path in what clients read
                assert late.registry.ready  # bbb serves: the replica stays in rotation
                with pytest.raises(ModelNotLoaded, match="version 1"):
                    late.registry.get("aaa")
                await late.registry.refresh()  # the store watch: still not version 2
                assert "aaa" not in late.registry.serving()
                await late._retry_failed()  # the engine process (re)connected: the pin, again
                assert "aaa" not in late.registry.serving() and "version 1" in late.registry.failed["aaa"]
                await late.reload("aaa", None)  # an operator unpins: the newest serves
                assert serves(late.registry) == ("2", False) and "aaa" not in late.registry.failed

    asyncio.run(main())
