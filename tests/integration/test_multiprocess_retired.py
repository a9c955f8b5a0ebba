"""A category the store watch retires takes its operator's pin with it in multi-process mode:
the engine process drops its record of the category's last reload (and the file beside its
socket), so a front end started later (a killed one's replacement) serves what the running
ones serve once the folder is back, the newest version, not the pin of a category that left
the store. Before, the running front ends served version 2 and each replacement version 1
(a real server: 28 answers of 60 on version 1 after one replacement, 60 of 60 after two).

In-process: an engine core and front ends' runtimes on one event loop (the fixtures of
multiprocess_fixtures.py); each front end's store watch is one :meth:`refresh` here.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from harness import fake_version, serves, until
from multiprocess_fixtures import engine_process, front_end, operator_reload, started_state
from service.engine_core.frontend import FrontEnd
from service.engine_core.relay import Relay


def _kept(settings_socket: Path) -> list[dict[str, object]]:
    """The engine process's record beside its socket (what a new engine process starts from)."""
    kept = settings_socket.with_name(f"{settings_socket.stem}-reloads.json")
    return json.loads(kept.read_text()) if kept.exists() else []


def test_a_retired_pinned_category_leaves_no_pin_for_a_later_front_end(two_version_store: Path,
                                                                       tmp_path: Path) -> None:
    store = two_version_store
    fake_version(store, "bbb", "1")  # the store does not list empty: a removal, not an unmount
    away = tmp_path / "aaa-away"

    async def main() -> None:
        async with engine_process(store, store_removal_grace_s=0) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end(settings) as (a, a_link), front_end(settings) as (b, b_link):
                await operator_reload(a, a_link, "aaa", "1")
                await until(lambda: serves(b.registry) == ("1", True), "b following the pin")
                assert any(m["category"] == "aaa" for m in _kept(settings.engine_socket))
                shutil.move(store / "aaa", away)
                await a.registry.refresh()  # a retires it first
                assert "aaa" not in a.registry.categories
                await until(lambda: "aaa" not in core.reloads, "the engine process dropping the pin")
                assert not any(m.get("op", "reload") == "reload" and m["category"] == "aaa"
                               for m in _kept(settings.engine_socket))
                # b has not scanned yet: a's retirement ended its pin (relayed), and it serves on
                # from memory until its own scan retires it.
                await until(lambda: "aaa" not in b.engine_link.reloads.record.latest, "b hearing a's retirement")
                assert serves(b.registry)[0] == "1"
                await b.registry.refresh()  # b retires it too: the same drop, again
                assert "aaa" not in b.registry.categories and "aaa" not in core.reloads
                # No front end holds a version of aaa: the engine process lets go of it.
                await until(lambda: not any("/aaa/" in folder for folder in core.hosted), "aaa unloaded")
                assert set(core.hosted) == {str(store / "bbb" / "1")}
                async with started_state(settings) as during:  # a replacement while it is away
                    assert "aaa" not in during.registry.categories
                    shutil.move(away, store / "aaa")
                    for registry in (a.registry, b.registry, during.registry):
                        await registry.refresh()  # a new category again: the newest, unpinned
                        assert serves(registry) == ("2", False)
                    async with started_state(settings) as after:  # a replacement once it is back
                        assert serves(after.registry) == ("2", False)
                        assert str(store / "aaa" / "1") not in core.hosted  # never loaded again
                # A new engine process (killed with the front ends' record beside its socket)
                # knows no pin of aaa either, and refuses the one a front end may still carry.
                relay = Relay({})
                relay.keep_at(settings.engine_socket.with_name(f"{settings.engine_socket.stem}-reloads.json"))
                assert "aaa" not in relay.reloads

    asyncio.run(main())


def test_a_late_retirement_leaves_a_newer_pin_alone_and_a_stale_handover_is_refused(tmp_path: Path) -> None:
    """Every front end retires on its own scans, each sending the stamp of the pin it knew: the
    drop is idempotent (relayed to the others once), never drops a reload newer than that stamp (an operator's pin after
    the folder came back), and a front end that still carries the dropped pin (started while
    the category was away; reconnecting to a new engine process) cannot bring it back."""

    class Silent:
        def __init__(self) -> None:
            self.sent: list[dict[str, object]] = []

        def send(self, message: dict[str, object]) -> None:
            self.sent.append(message)

    async def main() -> None:
        frontends: dict[int, FrontEnd] = {}
        first, second = FrontEnd(1, Silent()), FrontEnd(2, Silent())  # type: ignore[arg-type]
        frontends.update({1: first, 2: second})
        relay = Relay(frontends)
        relay.keep_at(tmp_path / "engine-reloads.json")
        relay.reload(first, {"op": "reload", "category": "aaa", "version": "1", "stamp": 10})
        relay.retire(first, {"op": "retired", "category": "aaa", "stamp": 10})
        relay.retire(second, {"op": "retired", "category": "aaa", "stamp": 10})  # the same drop, again
        assert relay.reloads == {}
        # The first retirement is relayed to the others (their pin ends too), once; none goes back.
        assert second.channel.sent == [{"op": "reload", "category": "aaa", "version": "1", "stamp": 10},
                                       {"op": "retired", "category": "aaa", "stamp": 10}]
        assert first.channel.sent == []
        relay.reload(second, {"op": "reload", "category": "aaa", "version": "1", "stamp": 10})  # a stale handover
        assert relay.reloads == {}
        relay.reload(first, {"op": "reload", "category": "aaa", "version": "2", "stamp": 20})  # a new pin
        relay.retire(second, {"op": "retired", "category": "aaa", "stamp": 10})  # a late retirement
        assert relay.reloads["aaa"]["version"] == "2"
        assert not any(m["op"] == "retired" for m in first.channel.sent)  # not relayed: the new pin holds
        again = Relay({})
        again.keep_at(tmp_path / "engine-reloads.json")
        assert again.reloads["aaa"]["stamp"] == 20
        relay.retire(first, {"op": "retired", "category": "aaa", "stamp": 20})
        again = Relay({})
        again.keep_at(tmp_path / "engine-reloads.json")
        assert again.reloads == {}
        again.reload(second, {"op": "reload", "category": "aaa", "version": "2", "stamp": 20})  # refused there too
        assert again.reloads == {}

    asyncio.run(main())



def test_a_front_end_started_while_a_pinned_category_is_away_serves_the_pin_until_it_is_retired(
        two_version_store: Path, tmp_path: Path) -> None:
    """The pinned category's folder left the store, and a front end starts within the grace
    (a killed one's replacement), greeted with the pin the running front end serves on from
    memory. Before, it could not follow it (no folder: unknown here), so when the folder came
    back within the grace it loaded version 2, unpinned, beside the others' pinned 1; nor did
    its store watch ever retire the category with the others. Now it serves the pin from the
    engine process's memory, and retires the category when it stays away."""
    store = two_version_store
    fake_version(store, "bbb", "1")
    away = tmp_path / "aaa-away"

    async def main() -> None:
        async with engine_process(store) as (core, settings):  # the default grace: nothing retires yet
            core.unload_grace_s = 0.1
            async with front_end(settings) as (a, a_link):
                await operator_reload(a, a_link, "aaa", "1")
                shutil.move(store / "aaa", away)
                await a.registry.refresh()
                async with started_state(settings) as late:
                    assert serves(late.registry) == ("1", True)
                    shutil.move(away, store / "aaa")  # back within the grace: the pin holds everywhere
                    for registry in (a.registry, late.registry):
                        await registry.refresh()
                        assert serves(registry) == ("1", True)
                    shutil.move(store / "aaa", away)  # away for good: both retire it
                    for registry in (a.registry, late.registry):
                        registry.removals.grace_s = 0
                        await registry.refresh()
                        assert "aaa" not in registry.categories
                    await until(lambda: "aaa" not in core.reloads, "the engine process dropping the pin")
                    await until(lambda: not any("/aaa/" in folder for folder in core.hosted), "aaa unloaded")

    asyncio.run(main())


def test_a_front_end_started_during_the_grace_serves_what_the_others_serve_once_the_folder_is_back(
        two_version_store: Path, tmp_path: Path) -> None:
    """A front end started while a pinned category is away follows the pin (from the engine
    process's memory) and starts its own removal grace then, later than the running ones'.
    The folder back after their grace and before its own: they retired the category (and its
    pin) and load version 2, unpinned; it never saw the category leave for a whole grace, so
    it serves the pinned version 1 beside them, for good (a front end started after serves 2)."""
    store = two_version_store
    fake_version(store, "bbb", "1")
    away = tmp_path / "aaa-away"

    async def main() -> None:
        async with engine_process(store) as (core, settings):
            async with front_end(settings) as (a, a_link):
                await operator_reload(a, a_link, "aaa", "1")
                shutil.move(store / "aaa", away)
                await a.registry.refresh()  # a's grace starts
                async with started_state(settings) as late:  # its grace starts now
                    assert serves(late.registry) == ("1", True)
                    a.registry.removals.grace_s = 0  # a's grace over (it saw the folder leave first)
                    await a.registry.refresh()
                    assert "aaa" not in a.registry.categories
                    await until(lambda: "aaa" not in core.reloads, "the engine process dropping the pin")
                    shutil.move(away, store / "aaa")  # back before late's grace is over
                    for registry in (a.registry, late.registry):
                        await registry.refresh()
                    assert serves(a.registry) == ("2", False)
                    assert serves(late.registry) == serves(a.registry)

    asyncio.run(main())
