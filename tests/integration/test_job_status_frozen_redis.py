"""Clients polling a job's status while Redis hangs (a frozen host, a stalled failover) get their
503s at once once one poll has found Redis hung, not each after the submissions' long timeout. Status reads went over the submissions'
own connection (no breaker, a timeout sized for a 64 MiB upload): every poll waited 3-6 s for
its 503, which said Retry-After: 1, and each held one of the connection's 64 slots meanwhile."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from PIL import Image

from harness import CATEGORY, RedisServer, fake_version, png_of, start


def test_status_polls_answer_at_once_while_redis_hangs(tmp_path: Path, private_redis: RedisServer) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    server = start(store, tmp_path / "server.log", engine="null", redis_url=private_redis.url)
    assert private_redis.proc is not None
    pid = private_redis.proc.pid
    try:
        image = png_of(Image.new("RGB", (32, 32), (90, 60, 40)))
        submitted = httpx.post(f"{server.url}/v1/jobs/{CATEGORY}", files=[("file", ("a.png", image, "image/png"))],
                               timeout=10)
        assert submitted.status_code == 202, submitted.text
        status_url = f"{server.url}/v1/jobs/{submitted.json()['id']}"
        assert httpx.get(status_url, timeout=10).status_code == 200
        os.kill(pid, signal.SIGSTOP)
        try:
            took = []
            for _ in range(4):
                started = time.monotonic()
                answer = httpx.get(status_url, timeout=30)
                took.append(time.monotonic() - started)
                assert answer.status_code == 503 and answer.headers.get("retry-after"), answer.text
                assert answer.json()["error"]["code"] == "redis_unavailable"
        finally:
            os.kill(pid, signal.SIGCONT)
        # The first finds Redis hung (the read's timeout, and its retry); the breaker answers the rest.
        assert took[0] < 5.0 and max(took[1:]) < 0.3, took
        time.sleep(3.5)  # the breaker's time (MSFLOW_REDIS_BREAKER_S) passes: Redis is asked again
        assert httpx.get(status_url, timeout=10).status_code == 200
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()
