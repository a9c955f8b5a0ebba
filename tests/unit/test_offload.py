"""The offload threads (service.pipeline.offload): results, errors, cancelled callers, trackers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.os_names import task_names
from service.pipeline.offload import Offload, gather_in_order


def kernel_name() -> str:
    return task_names()[threading.get_native_id()]


class Tracker:
    def __init__(self) -> None:
        self.running = 0
        self.finished = 0

    def call_started(self) -> None:
        self.running += 1

    def call_done(self) -> None:
        self.running -= 1
        self.finished += 1


def test_calls_run_in_named_threads_and_return_or_raise() -> None:
    async def main() -> None:
        offload = Offload(2, "decode")
        try:
            names = await asyncio.gather(*(offload.call(lambda: threading.current_thread().name) for _ in range(8)))
            assert set(names) <= {"decode_0", "decode_1"} and threading.current_thread().name not in names
            kernel_names = await asyncio.gather(*(offload.call(kernel_name) for _ in range(8)))
            assert set(kernel_names) <= {"decode_0", "decode_1"}  # what top -H and the benchmark see
            assert await offload.call(divmod, 17, 5) == (3, 2)
            with pytest.raises(ZeroDivisionError):
                await offload.call(divmod, 1, 0)
        finally:
            offload.close()
        with pytest.raises(RuntimeError):
            await offload.call(divmod, 1, 1)
    asyncio.run(main())


def test_a_caller_that_gives_up_is_skipped_if_not_started_and_tracked_to_the_end_if_started() -> None:
    async def main() -> None:
        offload = Offload(1, "engine")
        release, ran = threading.Event(), []
        tracker = Tracker()
        try:
            busy = asyncio.ensure_future(offload.call(release.wait, 5, tracker=tracker))
            queued = asyncio.ensure_future(offload.call(ran.append, "queued", tracker=tracker))
            await asyncio.sleep(0.05)
            busy.cancel()
            queued.cancel()
            await asyncio.sleep(0.05)
            assert tracker.running == 2  # the running call still holds its tracker
            release.set()
            for _ in range(200):
                if tracker.running == 0:
                    break
                await asyncio.sleep(0.01)
            assert tracker.running == 0 and tracker.finished == 2
            assert ran == []  # cancelled before a thread took it: never run
            assert busy.cancelled() and queued.cancelled()
            assert await offload.call(sum, [1, 2, 3], tracker=tracker) == 6 and tracker.finished == 3
        finally:
            offload.close()
    asyncio.run(main())


def test_close_runs_what_is_queued_then_joins_the_threads() -> None:
    async def main() -> None:
        offload = Offload(2, "closing")
        done: list[int] = []
        calls = [asyncio.ensure_future(offload.call(done.append, i)) for i in range(6)]
        await asyncio.sleep(0)  # every call queued
        await asyncio.gather(*calls)
        offload.close()
        assert sorted(done) == list(range(6))
        assert not any(t.name.startswith("closing_") for t in threading.enumerate())
    asyncio.run(main())


def test_gather_in_order_waits_for_every_call_and_raises_the_first_failure_in_order() -> None:
    async def value(v: int, delay: float = 0.0) -> int:
        await asyncio.sleep(delay)
        return v

    async def failing(message: str, delay: float) -> int:
        await asyncio.sleep(delay)
        raise ValueError(message)

    async def main() -> None:
        assert await gather_in_order([value(7)]) == [7]  # one call: awaited as it is
        assert await gather_in_order([value(1, 0.02), value(2), value(3, 0.01)]) == [1, 2, 3]
        finished: list[str] = []

        async def slow_ok() -> int:
            await asyncio.sleep(0.05)
            finished.append("slow")
            return 0

        with pytest.raises(ValueError, match="first"):  # first in order, not first in time
            await gather_in_order([failing("first", 0.03), failing("second", 0.0), slow_ok()])
        assert finished == ["slow"]  # every call was over before the failure was raised
        with pytest.raises(ValueError, match="alone"):
            await gather_in_order([failing("alone", 0.0)])

    asyncio.run(main())
