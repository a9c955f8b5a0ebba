"""An engine call that never returns (a wedged GPU, a driver deadlock), in both serving modes,
with a gated :class:`ValueEngine` standing in for it: the server leaves rotation (``/readyz``
503 ``engine_stalled``) once the engine has been on one batch past ``MSFLOW_ENGINE_STALL_S``;
one process fails liveness too (only a restart frees the thread), and the engine process of
several ends itself so that the supervisor starts a new one, as a worker does for its
orchestrator (its jobs are claimed by the others). Before, ``/readyz`` said 200 while every
request got 504, and nothing restarted anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness import CATEGORY, fake_version, until
from multiprocess_fixtures import ValueEngine, engine_process, front_end
from service.api.errors import ApiError
from service.api.health import healthz, readyz
from service.config import Settings
from service.pipeline.stall_watch import StallWatch
from service.pipeline.state import ServiceState

SIZE = 32  # fake_version's input size
LIMIT = dict(request_deadline_ms=500, engine_stall_s=1.0)


class HeldEngine(ValueEngine):
    """Holds a batch of white images at its gate (warm-ups, black, run through)."""

    def __init__(self, version_dir: Path) -> None:
        super().__init__(version_dir, 0.25, gated=True)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._warm = bool(images[0, 0, 0, 0] == 255)
        return super().run(images)


def _gated_factory(engines: list[HeldEngine]) -> Any:
    def factory(version_dir: Path, **_: Any) -> HeldEngine:
        engines.append(HeldEngine(version_dir))
        return engines[-1]
    return factory


async def _one_image_stuck(lane: Any, engine: ValueEngine) -> asyncio.Future[Any]:
    (future,) = lane.batcher.submit_many([np.full((SIZE, SIZE, 3), 255, np.uint8)], time.monotonic() + 0.5)
    await until(engine.started.is_set, "the batch to reach the engine")
    return future


def test_one_process_whose_engine_never_returns_leaves_rotation_and_fails_liveness(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY)
    engines: list[HeldEngine] = []

    async def main() -> None:
        state = ServiceState(Settings(model_store=store, engine="null", max_queue_delay_ms=1, store_poll_s=0, **LIMIT))
        state.registry._engine_factory = _gated_factory(engines)
        await state.start()
        try:
            await until(lambda: state.registry.ready, "the model to load")
            with state.pin(CATEGORY) as lane:
                future = await _one_image_stuck(lane, engines[0])
            assert (await readyz(state)).models == {CATEGORY: "1"}  # busy within the limit: still ready
            await asyncio.sleep(1.2)
            for probe in (readyz, healthz):
                with pytest.raises(ApiError) as refused:
                    await probe(state)
                assert refused.value.status_code == 503 and refused.value.code == "engine_stalled"
                assert refused.value.details["stalled_s"][CATEGORY] > 1.0
            # What a worker's watch reads (service/worker/main.py): the runtime's lanes.
            category, seconds = StallWatch(state.lanes.batchers, 1.0).stalled(time.monotonic()) or ("", 0.0)
            assert category == CATEGORY and seconds > 1.0
            engines[0].gate.set()  # the call returns after all (a slow engine, not a dead one)
            with contextlib.suppress(Exception):
                await future
            assert state.engine_stalled() == {}
            assert (await readyz(state)).models == {CATEGORY: "1"}
            await healthz(state)
        finally:
            for engine in engines:
                engine.gate.set()
            await state.stop()

    asyncio.run(main())


def test_the_engine_process_ends_itself_and_its_front_ends_leave_rotation(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY)
    engines: list[HeldEngine] = []
    stalls: list[tuple[str, float]] = []

    async def main() -> None:
        async with engine_process(store, _gated_factory(engines), **LIMIT) as (core, settings):
            core.stall_watch._on_stall = lambda category, seconds: stalls.append((category, seconds))  # not os._exit
            async with front_end(settings) as (rt, _):
                try:
                    with rt.pin(CATEGORY) as lane:
                        future = await _one_image_stuck(lane, engines[0])
                    await asyncio.sleep(0.5)
                    assert stalls == [] and rt.engine_stalled() == {}  # within the limit: a busy engine
                    await until(lambda: stalls, "the engine process's watch to see the stall", timeout=5)
                    assert stalls[0][0] == CATEGORY and stalls[0][1] > 1.0
                    # The front end sees it too (its request unanswered past the limit): where the
                    # engine process itself is stopped, no watch of its own runs.
                    assert rt.engine_stalled()[CATEGORY] > 1.0
                finally:
                    for engine in engines:
                        engine.gate.set()
                with contextlib.suppress(Exception):
                    await future
                assert rt.engine_stalled() == {}

    asyncio.run(main())


class _Running:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def running_for(self, now: float) -> float:
        return self.seconds


def test_the_watch_names_the_longest_stall_and_fires_once() -> None:
    batchers: list[tuple[str, Any]] = [("aaa", _Running(0.5)), ("bbb", _Running(3.0)), ("ccc", _Running(2.0))]
    fired: list[tuple[str, float]] = []
    watch = StallWatch(lambda: batchers, 1.0, on_stall=lambda c, s: fired.append((c, s)), period_s=0.01)
    assert watch.stalled(0.0) == ("bbb", 3.0)
    watch.start()
    try:
        time_out = time.monotonic() + 5
        while not fired and time.monotonic() < time_out:
            time.sleep(0.01)
        time.sleep(0.1)
        assert fired == [("bbb", 3.0)]  # once: the process is ending
    finally:
        watch.stop()
    assert StallWatch(lambda: [("aaa", _Running(0.9))], 1.0).stalled(0.0) is None


def test_a_stall_limit_within_the_request_deadline_is_refused() -> None:
    """A request may wait for the engine up to its deadline without anything being wrong."""
    with pytest.raises(ValueError, match="engine_stall_s"):
        Settings(request_deadline_ms=10_000, engine_stall_s=5)
    assert Settings(request_deadline_ms=10_000, engine_stall_s=0).engine_stall_s == 0  # never


def test_a_stall_ends_the_process_with_its_exit_code() -> None:
    """What the watch does by default, in a process of its own: says why, and exits 75 without
    waiting for the thread that never returns (an orderly shutdown would wait for it)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import logging, threading, time
        from service.pipeline.stall_watch import StallWatch
        logging.basicConfig(level=logging.INFO)
        class Stuck:
            def running_for(self, now): return 99.0
        threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon: exit() would wait for it
        StallWatch(lambda: [("brick", Stuck())], 1.0, period_s=0.05).start()
        time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 75, done.stderr
    assert "has run one batch for 99 s" in done.stderr
