"""An operator's pin under faults in multi-process mode: a follow cut off by the engine process
going away, and a new engine process greeting a replacement front end before the surviving
front ends handed it the pin. While a pin is in force no front end may answer with another
version.

In-process: an engine core and front ends' runtimes on one event loop (the fixtures of
multiprocess_fixtures.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx

from harness import ADMIN_KEY, assert_error, children, serves, start, until, wait_until
from multiprocess_fixtures import engine_process, front_end, operator_reload, pinned_to_version_1, started_state
from service.engine_core import EngineCore
from service.pipeline.registry_errors import ModelNotLoaded


def test_a_pin_whose_follow_the_engine_process_cut_off_is_followed_once_it_is_back(two_version_store: Path) -> None:
    """Front end b heard the operator's pin of version 1, and the engine process went away
    while b acquired it (a crash mid-follow). Before, b logged the failed follow and served
    version 2, unpinned, for good: the replay at the next connection carried a stamp b had
    recorded, so it was never followed again. Now b serves no other version meanwhile (503
    model_not_loaded) and follows the pin once the engine process is back."""
    store = two_version_store

    async def main() -> None:
        async with engine_process(store) as (core, settings):
            core.unload_grace_s = 0.1
            async with front_end(settings) as (a, a_link), front_end(settings) as (b, b_link):
                assert serves(a.registry) == serves(b.registry) == ("2", False)
                b_ident = max(core.frontends)  # b connected second
                acquire = core.engines.acquire
                cut: asyncio.Event = asyncio.Event()

                def acquire_cut_off(frontend, rid, version_dir):  # type: ignore[no-untyped-def]
                    if frontend.ident == b_ident:
                        cut.set()  # b's follow: never answered, the engine process "dies"
                        return None
                    return acquire(frontend, rid, version_dir)
                core.engines.acquire = acquire_cut_off  # type: ignore[method-assign]
                await operator_reload(a, a_link, "aaa", "1")
                await cut.wait()
                core.engines.acquire = acquire  # type: ignore[method-assign]
                core.frontends[b_ident].channel.close()  # the engine process went away under b's acquire
                await until(lambda: b_link.connected is False or b_link.channel is None, "b cut off")
                # While the pin holds, b never answers with version 2 (503, or version 1).
                seen: set[tuple[str, bool]] = set()
                deadline = asyncio.get_running_loop().time() + 3.0
                while asyncio.get_running_loop().time() < deadline:
                    try:
                        seen.add(serves(b.registry))
                    except ModelNotLoaded:
                        pass
                    if b_link.connected and ("1", True) in seen:
                        break
                    await asyncio.sleep(0.005)
                assert ("2", False) not in seen, seen
                await until(lambda: b_link.connected, "b back")
                await until(lambda: "aaa" in b.registry.serving() and serves(b.registry) == ("1", True),
                            "b following the pin once the engine process is back")
                # Neither front end holds version 2 any more: the engine process unloads it.
                await until(lambda: str(store / "aaa" / "2") not in core.hosted, "version 2 let go of")
                assert serves(a.registry) == serves(b.registry) == ("1", True)
                assert set(core.hosted) == {str(store / "aaa" / "1")}
                await operator_reload(a, a_link, "aaa", None)  # and the unpin reaches b as before
                await until(lambda: serves(b.registry) == ("2", False), "b unpinned")

    asyncio.run(main())


def test_a_replacement_front_end_greeted_by_a_new_engine_process_before_the_pin_came_back_serves_the_pin(
        two_version_store: Path) -> None:
    """The engine process and a front end died together (a node's OOM killer, a kill of the
    process group's children): the new engine process knows the operator's pin only once a
    surviving front end reconnects and hands it over; the replacement, quicker to connect
    (the survivor waits out its reconnect back-off, up to 1 s), was greeted with no pin,
    loaded version 2 and served it until the survivor came back. Now the engine process
    keeps the last reloads beside its socket, and a new one replays them from its first
    greeting."""
    store = two_version_store

    async def main() -> None:
        async with pinned_to_version_1(store) as (core, settings, a, a_link):
            await until(lambda: "aaa" in core.reloads, "the engine process recording the pin")
            # The engine process dies; a's reconnect back-off grows meanwhile.
            core.stop()
            await until(lambda: not a_link.connected, "a cut off")
            await asyncio.sleep(2.5)
            new_core = EngineCore(core.settings)
            serving = asyncio.create_task(new_core.serve(settings.engine_socket))
            try:
                await until(lambda: settings.engine_socket.exists(), "the new engine process listening")
                async with started_state(settings) as replacement:  # quicker than a's next attempt
                    assert "2" not in replacement.swapped_in, (replacement.swapped_in, a_link.connected)
                    assert serves(replacement.registry) == ("1", True)
                    await until(lambda: a_link.connected, "a back")
                    assert serves(a.registry) == ("1", True)
            finally:
                new_core.stop()
                await serving

    asyncio.run(main())


def test_a_reload_cut_off_by_the_engine_process_going_away_answers_503_engine_unavailable(
        two_version_store: Path, tmp_path: Path) -> None:
    """An operator pins a version while the engine process dies (a real server): the reload's
    acquire fails with the connection. Before, the answer was 500 reload_failed, 'an unexpected
    loader error ... details in the server log' with a traceback logged; it is the engine
    process restarting, which every other route answers 503 engine_unavailable + Retry-After."""
    server = start(two_version_store, tmp_path / "server.log", api_processes=2, engine="null", store_poll_s=0,
                   admin_api_keys=ADMIN_KEY)
    try:
        (engine,) = [pid for pid, name in children(server.proc.pid).items() if name == "msflow-engine"]
        os.kill(engine, signal.SIGSTOP)  # the acquire is sent, never answered: then the process dies
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{server.url}/v1/models/aaa/reload", params={"version": "1"},
                                 headers={"X-API-Key": ADMIN_KEY}, timeout=60)
            time.sleep(1.0)
            os.kill(engine, signal.SIGKILL)
            r = answer.result()
        assert_error(r, 503, "engine_unavailable")
        assert r.headers["Retry-After"]
        # Nothing was pinned: once the engine process is back every answer is version 2, unpinned.
        wait_until(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, 60, "ready again")
        models = httpx.get(f"{server.url}/v1/models", headers={"X-API-Key": ADMIN_KEY}, timeout=10).json()["models"]
        assert [(m["version"], m["pinned"]) for m in models] == [("2", False)]
    finally:
        server.stop()
