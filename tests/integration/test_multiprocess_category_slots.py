"""Two categories of one input size on a two-front-end server, one of them flooded: the other's
single requests are served, not refused for want of shared-memory slots its own queue never
used. ``max_queue_size`` is what one category's queue holds, so each category has that many
slots per front end (service/pipeline/engine_images.py); one pool per input size let the
flood take every slot, and the neighbour got 503 ``queue_full`` with its own queue empty.

A real server (two front ends, the engine process with the real ONNX engine of the test
model), 4 slots, and a batching window the flood's images wait out in the engine process:
16 connections keep the flooded category's slots full, retrying each refusal at once, while
a second client sends one image at a time to the neighbour."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import CATEGORY, Server, copy_version, metric, served, store_copy
from multiprocess_fixtures import MP

NEIGHBOUR = "neighbour"


@pytest.fixture(scope="module")
def two_categories(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = store_copy(model_store, tmp_path_factory.mktemp("category-slots"))
    (store / NEIGHBOUR).mkdir()
    copy_version(store / CATEGORY / "1", store / NEIGHBOUR / "1", NEIGHBOUR, "1")  # same input size
    log = tmp_path_factory.mktemp("category-slots-log") / "server.log"
    # A batch of 16 never fills from 2 x 4 slots: each image waits the 300 ms window holding its slot.
    with served(store, log, **MP, max_queue_size=4, max_batch_size=16, max_queue_delay_ms=300) as server:
        yield server


def test_a_flooded_category_leaves_its_neighbour_its_own_slots(two_categories: Server,
                                                              good_images: list[Path]) -> None:
    image = good_images[0].read_bytes()
    files = [("file", ("a.png", image, "image/png"))]

    async def main() -> tuple[collections.Counter[int], collections.Counter[str]]:
        flood: collections.Counter[int] = collections.Counter()
        neighbour: collections.Counter[str] = collections.Counter()
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=two_categories.url, timeout=30, limits=limits) as client, \
                httpx.AsyncClient(base_url=two_categories.url, timeout=30) as line_client:
            loop = asyncio.get_running_loop()
            stop = loop.time() + 6.0

            async def flooder() -> None:
                while loop.time() < stop:
                    r = await client.post(f"/v1/inspect/{CATEGORY}?heatmap=none", files=files)
                    flood[r.status_code] += 1
                    if r.status_code != 200:
                        await asyncio.sleep(0.005)  # a client that ignores Retry-After

            async def line() -> None:
                await asyncio.sleep(1.5)  # the flood holds its slots on both front ends first
                while loop.time() < stop:
                    r = await line_client.post(f"/v1/inspect/{NEIGHBOUR}?heatmap=none", files=files)
                    neighbour["200" if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"] += 1
                    if r.status_code != 200:
                        await asyncio.sleep(0.05)

            await asyncio.gather(*(flooder() for _ in range(16)), line())
        return flood, neighbour

    flood, neighbour = asyncio.run(main())
    # The slots did bind (the flood was refused for them), and the flood got work done...
    sync = httpx.Client(base_url=two_categories.url)
    assert metric(sync, "msflow_rejections_total", category=CATEGORY, reason="queue_full") > 0, flood
    assert flood[503] > 0 and flood[200] > 0, flood
    # ...while the neighbour, one image at a time on slots of its own, was never refused.
    assert set(neighbour) == {"200"}, neighbour
    assert neighbour["200"] >= 5, neighbour
    assert metric(sync, "msflow_rejections_total", category=NEIGHBOUR) == 0
