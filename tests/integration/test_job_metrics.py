"""The API's ``/metrics`` says whether a category's async jobs have a worker.

A job queued with no ``msflow worker`` alive answered ``workers: 0`` to its client, but
nothing on ``/metrics`` said it, so no alert could: ``msflow_job_workers{category}`` (live
heartbeats) and ``msflow_job_backlog{category}`` (unfinished jobs in its stream) are read
from Redis at each scrape, in one round trip under a short timeout. Against a real
redis-server, the real API and a real worker; a stopped or hung Redis costs a scrape half a
second at most, never its answer.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import (CATEGORY, RedisServer, WorkerProc, absolute, client_for, metric, png_variant, start, upload,
                     wait_until)

PREFIX = "msflow-job-metrics:"


def submit(api: httpx.Client, images: list[Path], count: int) -> None:
    for i in range(count):
        r = api.post(f"/v1/jobs/{CATEGORY}", params={"heatmap": "none"},
                     files=[upload("a.png", png_variant(images[0], f"{i}-{time.monotonic_ns()}"))])
        assert r.status_code == 202, r.text


def gauges(api: httpx.Client) -> tuple[float, float]:
    """(workers, backlog) of the category, from one scrape each."""
    return (metric(api, "msflow_job_workers", category=CATEGORY), metric(api, "msflow_job_backlog", category=CATEGORY))


def timed_scrape(api: httpx.Client) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = httpx.get(absolute(api, "/metrics"), timeout=10)
    return r, time.monotonic() - started


def test_the_gauges_show_jobs_waiting_for_no_worker_then_the_worker_that_runs_them(
        redis_store: Path, redis_server: RedisServer, good_images: list[Path], tmp_path: Path) -> None:
    common = dict(redis_url=redis_server.url, redis_prefix=PREFIX)
    server = start(redis_store, tmp_path / "api.log", **common)
    worker: WorkerProc | None = None
    try:
        with client_for(server) as api:
            assert gauges(api) == (0, 0)  # series from the first scrape: an alert sees them at 0
            submit(api, good_images, 3)
            assert gauges(api) == (0, 3)  # what the alert fires on, after 5 minutes

            worker = WorkerProc(redis_store, tmp_path / "w1.log", "w1", worker_block_s=0.5, **common)
            worker.wait_ready()
            wait_until(lambda: gauges(api) == (1, 0), 60, "one worker and no backlog on /metrics")

            worker.stop()  # SIGTERM: it leaves its heartbeat at once
            worker = None
            assert gauges(api) == (0, 0)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


@pytest.fixture
def stalling_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    if server.proc is not None:
        os.kill(server.proc.pid, signal.SIGCONT)  # never leave it stopped, whatever failed
    server.stop()


def test_a_scrape_while_redis_is_down_or_hung_answers_at_once_with_the_last_values(
        redis_store: Path, stalling_redis: RedisServer, good_images: list[Path], tmp_path: Path) -> None:
    # A breaker that would stay open the whole test, and no threshold sync during it: the hot
    # path's Redis is "ok" at the end only if no scrape tripped it.
    server = start(redis_store, tmp_path / "api.log", redis_url=stalling_redis.url, redis_prefix=PREFIX,
                   redis_breaker_s=60.0, threshold_sync_s=3600.0)
    try:
        with client_for(server) as api:
            submit(api, good_images, 2)
            assert gauges(api) == (0, 2)

            assert stalling_redis.proc is not None
            os.kill(stalling_redis.proc.pid, signal.SIGSTOP)  # hung, not gone: no answer, no reset
            try:
                r, took = timed_scrape(api)
            finally:
                os.kill(stalling_redis.proc.pid, signal.SIGCONT)
            assert r.status_code == 200 and took < 1.5, f"{r.status_code} after {took:.2f} s with Redis hung"
            assert 'msflow_job_backlog{category="brick"} 2.0' in r.text  # kept, not dropped nor zeroed
            assert 'msflow_redis_errors_total{operation="job_census"} 1.0' in r.text
            assert api.get("/readyz").json()["redis"] == "ok"  # the scrape left the hot path on Redis

            stalling_redis.stop()
            r, took = timed_scrape(api)
            assert r.status_code == 200 and took < 1.5, f"{r.status_code} after {took:.2f} s with Redis stopped"
            assert 'msflow_job_backlog{category="brick"} 2.0' in r.text
            assert metric(api, "msflow_redis_errors_total", operation="job_census") >= 2
    finally:
        server.stop()


def test_every_front_end_answers_the_latest_read(redis_store: Path, redis_server: RedisServer,
                                                 good_images: list[Path], tmp_path: Path) -> None:
    """Two front ends: each writes its own read into the multi-process files. Merged with
    ``livemax``, a front end not scraped since held the backlog (and a dead worker) up: after
    the stream emptied, the next scrape still said 3."""
    server = start(redis_store, tmp_path / "api.log", redis_url=redis_server.url, redis_prefix=PREFIX + "mp:",
                   api_processes=2)
    try:
        with client_for(server) as api:
            submit(api, good_images, 3)
            # Each scrape a new connection, which the kernel hands to either front end: both read 3.
            assert [metric(api, "msflow_job_backlog", category=CATEGORY) for _ in range(12)] == [3] * 12
            redis_server.client().xtrim(f"{PREFIX}mp:jobs:{CATEGORY}", maxlen=0)  # as workers finishing them do
            assert [metric(api, "msflow_job_backlog", category=CATEGORY) for _ in range(12)] == [0] * 12
    finally:
        server.stop()
