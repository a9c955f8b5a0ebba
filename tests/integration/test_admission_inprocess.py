"""Admission before decoding, on the real engine of the test model: the per-request pixel
budget (413), the server's (503 until pixels come back), a full queue refused before any
decode, a deadline that covers decode and render, and original-size heatmaps rendered at
the cap with the size rendered in the answer."""

from __future__ import annotations

import asyncio
import io
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from harness import CATEGORY, engine_run_replaced
from pipeline_fixtures import loaded_runtime
from service.pipeline.admission import RequestTooExpensive, ServerBusy
from service.pipeline.batch_queue import DeadlineExceeded, QueueFull
from service.pipeline.decode import fit_within
from service.pipeline.decode_memory import decode_weight
from service.pipeline.item import InspectedImage
from service.schemas import HeatmapMode, HeatmapSize, InspectOptions, Upload

ORIGINAL_OVERLAY = InspectOptions(heatmap=HeatmapMode.inline, heatmap_size=HeatmapSize.original, overlay=True)


def grey_png(width: int, height: int, level: int = 128) -> bytes:
    """Solid grey: a few KB on the wire, width x height pixels once decoded."""
    buf = io.BytesIO()
    Image.new("L", (width, height), level).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def received(*datas: bytes) -> list[InspectedImage]:
    return [InspectedImage.received(i, Upload(filename=f"{i}.png", data=d)) for i, d in enumerate(datas)]


def test_request_over_its_pixel_budget_is_refused_before_any_decode(model_store: Path) -> None:
    big = grey_png(1000, 1000)  # 1 MP each, ~1 KB each
    items = received(big, big)

    async def main() -> None:
        async with loaded_runtime(model_store, max_request_megapixels=1.5, max_inflight_megapixels=10) as rt:
            with rt.pin(CATEGORY) as lane:
                with pytest.raises(RequestTooExpensive) as info:
                    await rt.run(lane, items, InspectOptions(heatmap=HeatmapMode.none), time.monotonic() + 30,
                                 time.monotonic())
                assert rt.pixels.in_flight == 0
                one = received(big)
                await rt.run(lane, one, InspectOptions(heatmap=HeatmapMode.none), time.monotonic() + 30,
                             time.monotonic())
                assert one[0].stage == "answered" and rt.pixels.in_flight == 0
        # a grey pixel is priced at what its decode holds (1 byte, then 4 as RGB: decode_memory)
        grey_decode = math.ceil(1_000_000 * decode_weight("PNG", "L"))
        assert info.value.status_code == 413
        assert info.value.details["megapixels"] == round(2 * (grey_decode + 2 * 128 * 128) / 1e6, 3)

    asyncio.run(main())
    assert all(item.stage == "received" and item.tensor is None for item in items)  # priced from headers only


def test_server_budget_refuses_with_503_while_taken_and_admits_once_freed(model_store: Path,
                                                                          good_images: list[Path]) -> None:
    async def main() -> None:
        async with loaded_runtime(model_store, max_request_megapixels=1, max_inflight_megapixels=1) as rt:
            with rt.pin(CATEGORY) as lane:
                holder = rt.pixels.admit(999_000, CATEGORY)  # another request of the category, in flight
                items = received(good_images[0].read_bytes())
                with pytest.raises(ServerBusy):
                    await rt.run(lane, items, InspectOptions(), time.monotonic() + 30, time.monotonic())
                assert items[0].stage == "received"
                holder.close()
                await rt.run(lane, items, InspectOptions(), time.monotonic() + 30, time.monotonic())
                assert items[0].stage == "answered" and rt.pixels.in_flight == 0

    asyncio.run(main())


def test_a_fair_wait_that_reaches_the_deadline_is_refused_503_not_504(model_store: Path,
                                                                       good_images: list[Path]) -> None:
    """A request within its category's share waits while another category holds the budget
    (PixelBudget.admit_fairly), up to its deadline: then it was never admitted, so it is refused
    as the budget refuses (503 server_busy, Retry-After), never 504 as if it had started. The
    request's own deadline timer and the admission's both end the wait at that instant; the
    first used to win, so the answer depended on which fired first."""
    async def main() -> None:
        async with loaded_runtime(model_store, max_request_megapixels=1, max_inflight_megapixels=1) as rt:
            with rt.pin(CATEGORY) as lane:
                flood = rt.pixels.admit(999_000, "another")  # over its share once CATEGORY waits
                outcomes = []
                for _ in range(6):
                    items = received(good_images[0].read_bytes())
                    try:
                        await rt.run(lane, items, InspectOptions(), time.monotonic() + 0.05, time.monotonic())
                    except Exception as exc:  # noqa: BLE001 - the kind is what is checked
                        outcomes.append(type(exc).__name__)
                    assert items[0].stage == "received"
                assert outcomes == ["ServerBusy"] * 6
                flood.close()
                assert rt.pixels.in_flight == 0

    asyncio.run(main())


def blocked_engine(gate: threading.Event, entered: threading.Event) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def make(real_run: Callable[..., Any]) -> Callable[..., Any]:
        def run(batch: Any) -> Any:
            entered.set()
            gate.wait(30)
            return real_run(batch)
        return run
    return make


def test_full_queue_refuses_before_decoding(model_store: Path, good_images: list[Path]) -> None:
    """With the engine busy and the queue full, the next request is refused (QueueFull) with
    its images still undecoded: overload costs no decode CPU and no pixel memory."""
    gate, entered = threading.Event(), threading.Event()

    async def main() -> None:
        async with loaded_runtime(model_store, max_queue_size=2, max_batch_size=1, max_queue_delay_ms=0) as rt:
            with rt.pin(CATEGORY) as lane, engine_run_replaced(lane.model.engine, blocked_engine(gate, entered)):
                deadline = time.monotonic() + 30
                running = asyncio.create_task(rt.run(lane, received(good_images[0].read_bytes()), InspectOptions(),
                                                     deadline, time.monotonic()))
                while not entered.is_set():
                    await asyncio.sleep(0.01)
                queued = asyncio.create_task(rt.run(lane, received(*(p.read_bytes() for p in good_images[1:3])),
                                                    InspectOptions(), deadline, time.monotonic()))
                while lane.batcher.depth < 2:
                    await asyncio.sleep(0.01)
                refused = received(good_images[3].read_bytes())
                with pytest.raises(QueueFull):
                    await rt.run(lane, refused, InspectOptions(), deadline, time.monotonic())
                assert refused[0].stage == "received" and refused[0].decode_ms == 0.0
                gate.set()
                await asyncio.gather(running, queued)

    try:
        asyncio.run(main())
    finally:
        gate.set()


def test_deadline_covers_decode_and_the_pixels_stay_held_until_the_decode_returns(model_store: Path) -> None:
    """A 5000 x 5000 overlay cannot be decoded and rendered in 30 ms: 504 (DeadlineExceeded)
    at the deadline, not when the work ends; its pixels return to the budget only once the
    decode thread that holds them has finished."""
    items = received(grey_png(5000, 5000))

    async def main() -> None:
        async with loaded_runtime(model_store, max_request_megapixels=60, max_inflight_megapixels=60) as rt:
            with rt.pin(CATEGORY) as lane:
                t0 = time.monotonic()
                with pytest.raises(DeadlineExceeded):
                    await rt.run(lane, items, ORIGINAL_OVERLAY, t0 + 0.03, t0)
                assert time.monotonic() - t0 < 0.5
                assert rt.pixels.in_flight > 25_000_000  # the decode still runs, and still counts
                for _ in range(500):
                    if rt.pixels.in_flight == 0:
                        break
                    await asyncio.sleep(0.01)
                assert rt.pixels.in_flight == 0

    asyncio.run(main())


def test_original_size_heatmap_is_rendered_at_the_cap(model_store: Path, good_images: list[Path]) -> None:
    photo = Image.open(good_images[0]).convert("RGB").resize((2000, 1500))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    items = received(buf.getvalue())

    async def main() -> None:
        async with loaded_runtime(model_store, max_heatmap_pixels=500_000) as rt:
            with rt.pin(CATEGORY) as lane:
                await rt.run(lane, items, ORIGINAL_OVERLAY, time.monotonic() + 30, time.monotonic())

    asyncio.run(main())
    result = items[0].answer
    assert (result.image_size.width, result.image_size.height) == (2000, 1500)
    rendered = fit_within((2000, 1500), 500_000)
    assert rendered == (816, 612)
    assert (result.heatmap.width, result.heatmap.height) == rendered
    png = Image.open(io.BytesIO(items[0].heatmap_png))
    assert png.size == rendered
    assert items[0].display is None  # the background went with the request
    assert np.asarray(png).std() > 1.0  # an overlay of the photo, not a flat colour
