"""The pixel budget: per-request 413, server-wide 503, and pixels held until the threads
that decode them are done (not merely until the request gave up)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.pipeline.admission import PixelBudget, RequestTooExpensive, ServerBusy, image_cost
from service.pipeline.offload import Offload


def test_cost_counts_every_buffer_the_pipeline_holds() -> None:
    cost = image_cost(decoded=(400, 300), display=(200, 150), model_size=64, rendered=(200, 150), redecode=None)
    assert (cost.decode, cost.display, cost.model, cost.render) == (120_000, 30_000, 2 * 64 * 64, 30_000)
    assert cost.total == 120_000 + 30_000 + 8192 + 30_000


def test_request_over_its_budget_is_413_and_takes_nothing() -> None:
    async def main() -> None:
        budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=300)
        with pytest.raises(RequestTooExpensive) as info:
            budget.admit(101)
        assert info.value.status_code == 413 and info.value.code == "too_many_pixels"
        assert budget.in_flight == 0
        with pytest.raises(RequestTooExpensive):  # a worker would wait forever: refused at once too
            await budget.wait_admit(101, time.monotonic() + 5)
    asyncio.run(main())


def test_server_budget_is_503_until_pixels_come_back() -> None:
    async def main() -> None:
        seen: list[int] = []
        budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=250, on_change=seen.append)
        first, second = budget.admit(100), budget.admit(100)
        with pytest.raises(ServerBusy) as info:
            budget.admit(100)
        assert info.value.status_code == 503 and budget.in_flight == 200
        first.close()
        budget.admit(100).close()
        second.close()
        assert budget.in_flight == 0 and seen == [100, 200, 100, 200, 100, 0]
    asyncio.run(main())


def test_ticket_holds_its_pixels_while_its_threads_still_run() -> None:
    """A request that timed out while its image was still decoding must keep costing what
    that thread holds: the pixels come back when the thread returns, not before."""
    async def main() -> None:
        budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=100)
        release = threading.Event()
        offload = Offload(1, "decode")
        try:
            ticket = budget.admit(100)
            call = asyncio.ensure_future(offload.call(release.wait, 5, tracker=ticket))
            await asyncio.sleep(0.05)
            call.cancel()  # the request gives up (say, 504)...
            ticket.close()
            await asyncio.sleep(0.05)
            assert budget.in_flight == 100  # ...but its decode still runs
            with pytest.raises(ServerBusy):
                budget.admit(1)
            release.set()
            for _ in range(100):
                if budget.in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            assert budget.in_flight == 0
        finally:
            offload.close()
    asyncio.run(main())


def test_worker_waits_for_room_then_runs() -> None:
    async def main() -> None:
        budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=150)
        held = budget.admit(100)
        waiter = asyncio.create_task(budget.wait_admit(100, time.monotonic() + 5))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # back-pressure, not refusal
        held.close()
        ticket = await asyncio.wait_for(waiter, 1)
        assert budget.in_flight == 100
        ticket.close()
        with pytest.raises(ServerBusy):  # and a deadline bounds the wait
            budget.admit(100)
            await budget.wait_admit(100, time.monotonic() + 0.05)
    asyncio.run(main())
