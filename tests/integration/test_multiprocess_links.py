"""Heatmap links in multi-process mode without Redis: a link lives in the front end that made
it (service/redisq/store.py), and the kernel hands a GET to any front end, so most GETs of a
link answer 404 with 2 front ends. ``msflow serve`` says so at start, once."""

from __future__ import annotations

from pathlib import Path

import httpx

from harness import CATEGORY, part, start
from service.config import Settings
from service.supervisor import mode_warnings


def test_a_server_without_redis_warns_that_links_live_in_one_front_end(model_store: Path, tmp_path: Path,
                                                                       good_images: list[Path]) -> None:
    log = tmp_path / "server.log"
    server = start(model_store, log, api_processes=2, engine="null", store_poll_s=0)
    try:
        statuses = set()
        for _ in range(12):  # a connection each: spread over both front ends
            answer = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}", files=[part(good_images[0])],
                                params={"heatmap": "url"}, timeout=30)
            statuses.add(httpx.get(server.url + answer.json()["results"][0]["heatmap"]["url"]).status_code)
    finally:
        server.stop()
    assert statuses == {200, 404}, statuses  # what the warning is about (1 in 2^12 that it shows no 404)
    assert log.read_text().count("without MSFLOW_REDIS_URL: a heatmap=url link lives in the front end") == 1


def test_no_warning_with_redis() -> None:
    assert mode_warnings(Settings(api_processes=2, redis_url="redis://127.0.0.1:1/0")) == []
