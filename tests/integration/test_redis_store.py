"""Heatmap links and the result cache against a real redis-server and real ``msflow serve``
replicas (see ``tests/integration/conftest.py``)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from PIL import Image

from models.manifest import Manifest
from harness import REDIS_ADMIN_KEY as ADMIN_KEY, CATEGORY, PREFIX, REDIS_USER_KEY as USER_KEY, assert_error, RedisServer, Server, client_for, metric, png_variant, upload

INSPECT = f"/v1/inspect/{CATEGORY}"
LINK = re.compile(r"^/v1/heatmaps/([A-Za-z0-9_-]{32})\.png$")


def batches(client: httpx.Client) -> float:
    return metric(client, "msflow_batch_size_count", category=CATEGORY)


def cache(client: httpx.Client, result: str) -> float:
    return metric(client, "msflow_cache_requests_total", result=result)


def drift(client: httpx.Client) -> float:
    return metric(client, "msflow_score_count", category=CATEGORY)


def test_heatmap_link_round_trip_and_expiry(redis_apis: dict[str, Server], redis_server: RedisServer,
                                            good_images: list[Path]) -> None:
    cached, plain = redis_apis["cached"], redis_apis["plain"]
    with client_for(cached, USER_KEY) as c, client_for(plain) as other:
        r = c.post(INSPECT, params={"heatmap": "url"}, files=[upload("a.png", png_variant(good_images[0], "link"))])
        assert r.status_code == 200, r.text
        heat = r.json()["results"][0]["heatmap"]
        link_id = LINK.match(heat["url"]).group(1)  # type: ignore[union-attr]
        remaining = (datetime.fromisoformat(heat["expires_at"]) - datetime.now(timezone.utc)).total_seconds()
        assert 0.5 < remaining <= 1.5 and (heat["width"], heat["height"]) == (128, 128)
        # stored in Redis under the configured prefix, with the TTL
        assert 0 < redis_server.client().pttl(f"{PREFIX}heatmap:{link_id}") <= 1500
        for client in (c, other):  # this replica, and another one (from Redis)
            got = client.get(heat["url"])
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(got.content)).size == (128, 128)
        assert_error(httpx.get(cached.url + heat["url"]), 401, "missing_api_key")
        assert_error(c.get("/v1/heatmaps/" + "x" * 32 + ".png"), 404, "heatmap_not_found")
        assert_error(c.get("/v1/heatmaps/not-a-link.png"), 404, "heatmap_not_found")
        time.sleep(max(0.0, remaining) + 0.1)
        for client in (c, other):
            assert_error(client.get(heat["url"]), 404, "heatmap_not_found")


def test_cache_hit_skips_the_engine(redis_apis: dict[str, Server], good_images: list[Path]) -> None:
    with client_for(redis_apis["cached"], USER_KEY) as c:
        image = png_variant(good_images[1], "hit")
        other = png_variant(good_images[2], "hit")
        b0, hits0, misses0 = batches(c), cache(c, "hit"), cache(c, "miss")
        images0, scores0 = metric(c, "msflow_images_total", category=CATEGORY), drift(c)
        first = c.post(INSPECT, files=[upload("x.png", image)]).json()["results"][0]
        assert first["cached"] is False and first["heatmap"]["data"]
        assert batches(c) == b0 + 1 and cache(c, "miss") == misses0 + 1
        second = c.post(INSPECT, files=[upload("renamed.png", image)]).json()["results"][0]
        assert batches(c) == b0 + 1, "a cache hit must not reach the engine"
        assert cache(c, "hit") == hits0 + 1
        # Both answers count as images answered; the drift metrics (score histogram, anomaly
        # rate, recent scores) saw the part once: a client's retry of the same bytes is no new part.
        assert metric(c, "msflow_images_total", category=CATEGORY) == images0 + 2
        assert drift(c) == scores0 + 1
        assert second["cached"] is True and second["filename"] == "renamed.png"
        for key in ("score", "raw_score", "threshold", "is_anomalous", "model_version", "heatmap", "image_size"):
            assert second[key] == first[key], key
        assert second["timings_ms"]["engine"] == 0.0 and second["timings_ms"]["total"] < first["timings_ms"]["total"]
        # another heatmap mode is another answer: a miss; a mixed request sends only the miss to the engine
        assert c.post(INSPECT, params={"heatmap": "none"}, files=[upload("x.png", image)]).json()["results"][0][
            "cached"] is False
        mixed = c.post(INSPECT, files=[upload("x.png", image), upload("y.png", other)]).json()["results"]
        assert [r["cached"] for r in mixed] == [True, False] and mixed[1]["batch_size"] == 1
        assert [r["index"] for r in mixed] == [0, 1]
        assert batches(c) == b0 + 3
        # a PNG answer is always computed (the cache holds JSON results)
        png = c.post(INSPECT, files=[upload("x.png", image)], headers={"Accept": "image/png"})
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and batches(c) == b0 + 4
        # a cached inline heatmap is the same PNG
        assert Image.open(io.BytesIO(base64.b64decode(second["heatmap"]["data"]))).size == (128, 128)


def test_new_model_version_misses(redis_apis: dict[str, Server], redis_store: Path, good_images: list[Path]) -> None:
    src, dst = redis_store / CATEGORY / "1", redis_store / CATEGORY / "2"
    shutil.copytree(src, dst)
    Manifest.read(dst).model_copy(update={"version": "2"}).write(dst)
    admin = {"X-API-Key": ADMIN_KEY}
    try:
        with client_for(redis_apis["cached"], USER_KEY) as c:
            image = png_variant(good_images[3], "version")
            assert c.post(INSPECT, files=[upload("v.png", image)]).json()["results"][0]["model_version"] == "1"
            assert c.post(INSPECT, files=[upload("v.png", image)]).json()["results"][0]["cached"] is True
            assert c.post(f"/v1/models/{CATEGORY}/reload", headers=admin).json()["version"] == "2"
            b0 = batches(c)
            after = c.post(INSPECT, files=[upload("v.png", image)]).json()["results"][0]
            assert after["cached"] is False and after["model_version"] == "2" and batches(c) == b0 + 1
            assert c.post(INSPECT, files=[upload("v.png", image)]).json()["results"][0]["cached"] is True
            # back to version 1: its entries are still there (keys carry the version)
            assert c.post(f"/v1/models/{CATEGORY}/reload", params={"version": "1"}, headers=admin).status_code == 200
            back = c.post(INSPECT, files=[upload("v.png", image)]).json()["results"][0]
            assert back["cached"] is True and back["model_version"] == "1"
    finally:
        shutil.rmtree(dst)


def test_cache_can_be_switched_off(redis_apis: dict[str, Server], good_images: list[Path]) -> None:
    with client_for(redis_apis["plain"]) as c:
        image = png_variant(good_images[4], "off")
        b0 = batches(c)
        results = [c.post(INSPECT, files=[upload("o.png", image)]).json()["results"][0] for _ in range(2)]
        assert [r["cached"] for r in results] == [False, False] and batches(c) == b0 + 2
        assert sum(cache(c, k) for k in ("hit", "miss", "error")) == 0
        assert c.get("/readyz").json()["redis"] == "ok"


def test_a_link_key_holding_more_than_any_heatmap_is_not_read_whole(private_redis: RedisServer) -> None:
    """A heatmap key larger than the largest PNG this server renders (another writer's, or
    garbage) was read whole and served: 200 MB into the process per GET (RSS +132 MB), and the
    read outlasted the call's bound and opened the breaker. Now at most one byte past the
    limit is read and the link is 404; a key of another type is 404, not 503 "retry later";
    the breaker stays closed and real links are served."""
    import asyncio

    from service.config import Settings, largest_heatmap_png_bytes
    from service.redisq.connection import RedisConnection
    from service.redisq.store import HeatmapLinks

    settings = Settings(redis_url=private_redis.url, redis_prefix=PREFIX, model_store=Path("."),
                        max_heatmap_pixels=64 * 64, heatmap_max_bytes=1 << 20)
    limit = largest_heatmap_png_bytes(64 * 64)
    big, other_type, exact = "B" * 32, "H" * 32, "E" * 32
    r = private_redis.client()
    r.set(f"{PREFIX}heatmap:{big}", b"\x89PNG" + b"x" * (4 * limit))
    r.set(f"{PREFIX}heatmap:{exact}", b"y" * limit)
    r.hset(f"{PREFIX}heatmap:{other_type}", "a", "b")

    async def main() -> None:
        conn = RedisConnection(settings)
        links = HeatmapLinks(settings, conn, memory=False)
        try:
            assert await links.get(big) is None
            assert await links.get(other_type) is None
            assert await links.get(exact) == b"y" * limit  # the largest a heatmap can be is served
            assert await links.get("N" * 32) is None
            link, durable = await links.put(b"\x89PNG-small", 8, 8)
            assert durable and await links.get(link.url.split("/")[-1][:-4]) == b"\x89PNG-small"
            assert not conn.skipping
        finally:
            await conn.aclose()

    asyncio.run(main())
