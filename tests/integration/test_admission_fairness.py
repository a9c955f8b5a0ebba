"""Two categories on one server, one of them flooded: the other's requests are served within
its fair share of the pixel budget, not refused (503) because the flood holds all of it.

A real server (one process, the real engine of the test model) with a pixel budget of a few
of the flooded category's images: a misbehaving client keeps 16 of them in flight, retrying
each refusal at once, while a second line sends one small image at a time."""

from __future__ import annotations

import asyncio
import collections
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from harness import CATEGORY, Server, copy_version, served, store_copy
from models.manifest import Manifest
from service.pipeline.decode import ImageLimits, probe_into
from service.pipeline.item import InspectedImage

NEIGHBOUR = "neighbour"


FLOOD_IMAGE_SIDE = 1000


def grey_png(side: int) -> bytes:
    """A few KB on the wire, ~1.2 megapixels of the budget once priced (grey: 5.5 bytes a pixel)."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def price(data: bytes, input_size: int) -> int:
    """What admission charges for one image (heatmap=none), as the server prices it."""
    item = InspectedImage(0, "x.png", data)
    probe_into(item, input_size, ImageLimits(max_bytes=1 << 30, max_pixels=1 << 30))
    return item.cost


@pytest.fixture(scope="module")
def two_categories(model_store: Path, good_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = store_copy(model_store, tmp_path_factory.mktemp("fairness"))
    (store / NEIGHBOUR).mkdir()
    copy_version(store / CATEGORY / "1", store / NEIGHBOUR / "1", NEIGHBOUR, "1")
    log = tmp_path_factory.mktemp("fairness-log") / "server.log"
    # Four of the flood's images exactly, and less than one of the neighbour's left over: once
    # the flood holds four, nothing else fits until one of them is answered.
    size = Manifest.read(store / CATEGORY / "1").input_size
    small = min(price(p.read_bytes(), size) for p in good_images)
    budget = 4 * price(grey_png(FLOOD_IMAGE_SIDE), size) + small // 2
    with served(store, log, max_request_megapixels=2, max_inflight_megapixels=f"{budget / 1e6:.6f}",
                store_poll_s=0) as server:
        yield server


def test_flooded_category_leaves_its_neighbour_a_fair_share(two_categories: Server, good_images: list[Path]) -> None:
    flood_image, small_image = grey_png(FLOOD_IMAGE_SIDE), good_images[0].read_bytes()

    async def main() -> tuple[collections.Counter[int], collections.Counter[int], list[float]]:
        flood: collections.Counter[int] = collections.Counter()
        neighbour: collections.Counter[int] = collections.Counter()
        latencies: list[float] = []
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=two_categories.url, timeout=30, limits=limits) as client:
            stop = time.monotonic() + 5.0

            async def flooder() -> None:
                while time.monotonic() < stop:
                    r = await client.post(f"/v1/inspect/{CATEGORY}?heatmap=none",
                                          files=[("file", ("a.png", flood_image, "image/png"))])
                    flood[r.status_code] += 1
                    if r.status_code != 200:
                        await asyncio.sleep(0.01)  # a client that ignores Retry-After

            async def line() -> None:
                await asyncio.sleep(1.0)  # the flood holds the whole budget first
                while time.monotonic() < stop:
                    started = time.monotonic()
                    r = await client.post(f"/v1/inspect/{NEIGHBOUR}?heatmap=none",
                                          files=[("file", ("b.png", small_image, "image/png"))])
                    neighbour[r.status_code] += 1
                    if r.status_code == 200:
                        latencies.append(time.monotonic() - started)
                    else:
                        await asyncio.sleep(0.05)

            await asyncio.gather(*(flooder() for _ in range(16)), line())
        return flood, neighbour, latencies

    flood, neighbour, latencies = asyncio.run(main())
    # The budget did bind (the flood was refused), and the flood still got work done...
    assert flood[503] > 0 and flood[200] > 0, flood
    # ...while the neighbour, one small request at a time, far within half the budget, was
    # never refused: it waits for the room the flood holds beyond its share instead.
    assert set(neighbour) == {200}, neighbour
    assert len(latencies) >= 5, neighbour
