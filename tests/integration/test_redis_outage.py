"""Redis stopped and restarted under a stream of synchronous requests (cache on,
``heatmap=url``): not one 5xx, links keep working, ``/readyz`` says degraded and stays 200,
and the cache is back once Redis is."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import (CATEGORY, RedisServer, Server, client_for, metric, png_variant, start_servers, upload,
                            wait_until)


@pytest.fixture(scope="module")
def outage_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("outage-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "front-ends"])
def outage_api(model_store: Path, outage_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[Server]:
    """One process, and two front ends (each with its own breaker and probe, links in files
    and Redis): whichever front end a request or a probe reaches, the outage looks the same.
    A prefix each: the second would hit the first's cached results, whose links only Redis
    knows (503 while it is down, as for any other replica's)."""
    front_ends = {"api_processes": request.param, "engine": "onnx"} if request.param > 1 else {}
    servers = start_servers({"api": (model_store, tmp_path_factory.mktemp("outage-logs") / "api.log", dict(
        redis_url=outage_redis.url, redis_prefix=f"outage{request.param}:", redis_breaker_s=0.5, heatmap_ttl_s=30,
        max_queue_delay_ms=5, **front_ends))})
    yield servers["api"]
    servers["api"].stop()


def readyz(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text  # never out of rotation because of Redis
    return r.json()


def test_sync_path_survives_a_redis_outage(outage_api: Server, outage_redis: RedisServer,
                                           good_images: list[Path]) -> None:
    images = [png_variant(p, "outage") for p in good_images[:3]]
    phase = "up"
    seen: list[tuple[str, int, bool | None, float]] = []  # phase at the start, status, cached, seconds
    link_statuses: list[int] = []
    stop = threading.Event()

    def stream(offset: int) -> None:
        with client_for(outage_api) as c:
            i = offset
            while not stop.is_set():
                t0, started_in = time.monotonic(), phase
                r = c.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "url"},
                           files=[upload(f"{i % 3}.png", images[i % 3])])
                ok = r.status_code == 200
                result = r.json()["results"][0] if ok else None
                seen.append((started_in, r.status_code, result["cached"] if result else None, time.monotonic() - t0))
                if result is not None:
                    link_statuses.append(c.get(result["heatmap"]["url"]).status_code)
                i += 1

    with client_for(outage_api) as c:
        assert readyz(c)["redis"] == "ok"
        errors0 = metric(c, "msflow_cache_requests_total", result="error")
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: sum(1 for s in seen if s[0] == "up" and s[2]) >= 2, 30, "cache hits before the outage")
            outage_redis.stop()
            phase = "down"  # requests started from now on find Redis gone
            assert readyz(c)["redis"] == "degraded"
            wait_until(lambda: sum(1 for s in seen if s[0] == "down") >= 10, 30, "requests during the outage")
            assert readyz(c)["redis"] == "degraded"
            phase = "restarting"  # from here a request may find Redis again, and the cache with it
            outage_redis.start()  # same port, empty (no persistence)
            # ok once the hot path's breaker lets Redis in again: /readyz's PING only looks
            wait_until(lambda: readyz(c)["redis"] == "ok", 10, "/readyz to report Redis ok again")
            phase = "back"
            wait_until(lambda: any(s[0] == "back" and s[2] for s in seen), 30, "cache hits after the outage")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        statuses = {s[1] for s in seen}
        assert statuses == {200}, [s for s in seen if s[1] != 200][:5]
        assert set(link_statuses) == {200}
        down = [s for s in seen if s[0] == "down"]
        assert not any(s[2] for s in down)  # the cache is bypassed, not failing the request
        assert metric(c, "msflow_cache_requests_total", result="error") > errors0
        assert metric(c, "msflow_heatmap_links_total", store="memory") > 0
        # an outage must not stall requests: socket timeouts + breaker keep them short
        assert sorted(s[3] for s in down)[len(down) // 2] < 2.0


@pytest.mark.parametrize("heatmap", ["inline", "url"])
def test_a_hung_redis_costs_a_short_deadline_its_cache_not_its_answer(tmp_path: Path, private_redis: RedisServer,
                                                                      heatmap: str) -> None:
    """The cache lookup comes before any work, and the link's write before the answer, and
    each waited for a hung Redis as long as any call (~0.6 s): a request whose deadline was
    shorter than that plus its engine time answered 504 (measured on a served brick,
    MSFLOW_REQUEST_DEADLINE_MS=800, DEBUG SLEEP: 6 of 8 concurrent heatmap=url inspections).
    Each may take a quarter of the time left; a slower lookup is a miss, a slower link stays in
    this process (and works), and the answer is computed in the rest."""
    import asyncio
    import os
    import signal

    from harness import engine_run_replaced, fake_version, noise, png_of
    from PIL import Image
    from pipeline_fixtures import settings_for
    from service.pipeline.state import ServiceState
    from service.schemas import HeatmapLink, HeatmapMode, InspectOptions, Upload

    store = tmp_path / "store"
    fake_version(store, CATEGORY)
    image = png_of(Image.fromarray(noise(32, 32)))
    assert private_redis.proc is not None
    pid = private_redis.proc.pid

    def slow(real_run: Any) -> Any:  # an engine that takes its time: 0.25 s a batch
        def run(batch: Any) -> Any:
            time.sleep(0.25)
            return real_run(batch)
        return run

    async def main() -> None:
        state = ServiceState(settings_for(store, engine="null", redis_url=private_redis.url, max_queue_delay_ms=1))
        await state.start()
        try:
            while not state.registry.ready:
                await asyncio.sleep(0.02)
            with state.pin(CATEGORY) as lane, engine_run_replaced(lane.model.engine, slow):
                os.kill(pid, signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    items = await state.inspect(lane, [Upload("a.png", image)],
                                                InspectOptions(heatmap=HeatmapMode(heatmap)), started + 0.6, started)
                    took = time.monotonic() - started
                finally:
                    os.kill(pid, signal.SIGCONT)
            assert items[0].answer is not None and not items[0].cached and took < 0.6
            link = items[0].answer.heatmap
            if isinstance(link, HeatmapLink):  # kept in this process: served
                assert not items[0].durable and await state.links.get(link.url.split("/")[-1][:-4])
        finally:
            os.kill(pid, signal.SIGCONT)
            await state.stop()

    asyncio.run(main())


def test_a_cached_answer_never_hands_out_a_link_its_budget_evicted(tmp_path: Path, private_redis: RedisServer) -> None:
    """Links and cached results have budgets of their own: links written faster than their
    budget holds are evicted before their TTL while the cached results naming them live on,
    and the same image sent again (a client's retry, another replica) was answered from the
    cache with a link already 404. Such a hit is a miss now: the image is scored again and
    gets a link that works."""
    import asyncio

    from harness import fake_version, noise, png_of
    from PIL import Image
    from pipeline_fixtures import settings_for
    from service.pipeline.state import ServiceState
    from service.schemas import HeatmapLink, HeatmapMode, InspectOptions, Upload

    store = tmp_path / "store"
    fake_version(store, CATEGORY)
    images = [png_of(Image.fromarray(noise(32, 32, seed=i))) for i in range(80)]
    url = InspectOptions(heatmap=HeatmapMode.url)

    async def main() -> None:
        # room for a few dozen small links; one in this process's memory (another replica's view)
        state = ServiceState(settings_for(store, engine="null", redis_url=private_redis.url, max_queue_delay_ms=1,
                                          max_heatmap_pixels=32 * 32, heatmap_max_bytes=70_000,
                                          heatmap_memory_items=1))
        await state.start()
        try:
            while not state.registry.ready:
                await asyncio.sleep(0.02)

            async def one(data: bytes) -> tuple[bool, HeatmapLink]:
                with state.pin(CATEGORY) as lane:
                    item = (await state.inspect(lane, [Upload("a.png", data)], url, time.monotonic() + 10,
                                                time.monotonic()))[0]
                assert isinstance(item.answer.heatmap, HeatmapLink) and item.durable
                return item.cached, item.answer.heatmap

            _, first = await one(images[0])
            assert (await one(images[0]))[0]  # a hit while its link lives
            for data in images[1:]:
                await one(data)
            link_id = first.url.split("/")[-1][:-4]
            assert await state.links.get(link_id) is None  # evicted by the links' budget
            cached, again = await one(images[0])
            assert not cached and await state.links.get(again.url.split("/")[-1][:-4])
        finally:
            await state.stop()

    asyncio.run(main())
