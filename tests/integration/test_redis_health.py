"""A Redis down while no request arrives is seen by monitoring.

``MsflowRedisErrors`` counts failed calls, and calls come from traffic: with Redis stopped and
no client, nothing failed and nothing fired. Every API process and worker now PINGs Redis every
``MSFLOW_REDIS_PROBE_S`` (5 s) off the request path (``msflow_redis_up``, service/redisq/probe.py), and
``MsflowRedisDown`` reads it (its promtool test: tests/promtool/alerts_test.yml). Here the
real ``/metrics`` of a server (one process, then two front ends) and of a worker, with no
request at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import RedisServer, WorkerProc, free_port, start, wait_until
from service.metrics import ServiceMetrics
PROBE_S = 0.5  # MSFLOW_REDIS_PROBE_S here (5 s by default)
SETTLE_S = PROBE_S + 5  # one probe period, its bounded PING, and a loaded machine


@pytest.fixture()
def redis_down_up(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def redis_up(url: str) -> list[float]:
    """Every ``msflow_redis_up`` sample of the ``/metrics`` at ``url``."""
    text = httpx.get(url, timeout=10).text
    return [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "msflow_redis_up"]


def test_no_redis_configured_exports_no_redis_up_series() -> None:
    """0 would read as Redis down (and fire the alert) on a server that runs without Redis."""
    metrics = ServiceMetrics()
    assert b"msflow_redis_up" not in metrics.exposition()[0]
    metrics.set_redis_up(False)
    assert b"msflow_redis_up 0.0" in metrics.exposition()[0]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_redis_down_with_no_traffic_shows_on_every_metrics_endpoint(
        model_store: Path, redis_down_up: RedisServer, tmp_path: Path, processes: int) -> None:
    settings = dict(redis_url=redis_down_up.url, redis_prefix="msflow-probe:", store_poll_s=0, redis_probe_s=PROBE_S,
                    **({"api_processes": processes, "engine": "onnx"} if processes > 1 else {}))
    server = start(model_store, tmp_path / "api.log", **settings)
    port = free_port()
    worker = WorkerProc(model_store, tmp_path / "worker.log", "probe-worker", redis_url=redis_down_up.url,
                        redis_prefix="msflow-probe:", worker_metrics_port=port, host="127.0.0.1", store_poll_s=0,
                        redis_probe_s=PROBE_S)
    endpoints = {"api": f"{server.url}/metrics", "worker": f"http://127.0.0.1:{port}/metrics"}
    try:
        worker.wait_ready()

        def each_says(value: float) -> bool:
            # One series per endpoint: several front ends merge into the lowest (livemin)
            return all(redis_up(url) == [value] for url in endpoints.values())

        wait_until(lambda: each_says(1.0), SETTLE_S, "msflow_redis_up 1 on the API and the worker")
        redis_down_up.stop()  # no request from here on
        wait_until(lambda: each_says(0.0), SETTLE_S, "msflow_redis_up 0 with Redis down and no traffic")
        redis_down_up.start()
        wait_until(lambda: each_says(1.0), SETTLE_S, "msflow_redis_up 1 again once Redis is back")
    finally:
        worker.stop()
        server.stop()
