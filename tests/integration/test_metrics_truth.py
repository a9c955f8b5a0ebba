"""What ``/metrics`` and ``/readyz`` say is what happened, and asking changes nothing.

Against ``msflow serve`` (one process, and two front ends with an engine process), a real
redis-server, real kills:

* warm-up batches are not traffic: in multi-process mode each front end's warm-up of a
  version ran through the engine process's batcher and was counted (a batch of 8 per
  front-end start and per reload: a mean batch size of 2.6 where every batch held 1);
* a version swapped out leaves ``msflow_model_info`` (multi-process files kept it at 0 for
  the life of the process, and the "Models serving" table listed it);
* ``msflow_queue_depth`` (the autoscaler's metric) stays a series through an engine
  process's restart (it left ``/metrics`` with the killed process until the first batch);
* a ``/readyz`` during a Redis stall reports it, without turning Redis off for the hot path
  (its PING opened the breaker: the next inspection skipped the cache and kept its heatmap
  link in this process's memory).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from harness import (ADMIN_KEY, CATEGORY, PREFIX, RedisServer, absolute, children, copy_version, metric, part, start,
                     wait_until)

ROOT = Path(__file__).resolve().parents[2]
# What is observed once per batch, per image, or per batch and front end: none of it may move
# without an inspection.
BATCH_SERIES = ("msflow_batch_size_count", "msflow_batch_size_sum", "msflow_engine_seconds_count",
                "msflow_queue_wait_seconds_count", "msflow_batch_frontends_count", "msflow_batch_frontends_sum")


def samples(client: httpx.Client, name: str) -> list[Sample]:
    """Every sample of ``name`` on one scrape."""
    text = httpx.get(absolute(client, "/metrics")).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def batch_counts(client: httpx.Client) -> dict[str, float]:
    return {name: metric(client, name, category=CATEGORY) for name in BATCH_SERIES}




def engine_pid(server_pid: int) -> int | None:
    engines = [p for p, name in children(server_pid).items() if name == "msflow-engine"]
    return engines[0] if len(engines) == 1 else None


@pytest.fixture
def store(model_store: Path, tmp_path: Path) -> Path:
    """A copy of the store of the test's own (a test adds a version)."""
    dest = tmp_path / "store"
    shutil.copytree(model_store, dest)
    return dest


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-front-ends"])
def test_warm_ups_are_not_batches_and_a_retired_version_leaves_the_metrics(store: Path, tmp_path: Path,
                                                                           good_images: list[Path],
                                                                           processes: int) -> None:
    server = start(store, tmp_path / "server.log", api_processes=processes, engine="onnx", store_poll_s=0,
                   admin_api_keys=ADMIN_KEY, max_batch_size=8, max_queue_delay_ms=5)
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        # Started (each front end warmed version 1 with a batch of 8), nothing inspected yet.
        for _ in range(3):  # scrapes spread over the front ends: each adds up every process
            assert batch_counts(client) == dict.fromkeys(BATCH_SERIES, 0.0)
        copy_version(store / CATEGORY / "1", store / CATEGORY / "2", CATEGORY, "2")
        r = client.post(f"/v1/models/{CATEGORY}/reload", headers={"X-API-Key": ADMIN_KEY})
        assert r.status_code == 200 and r.json()["version"] == "2", r.text
        # The other front end follows (and warms version 2 too): version 1's info series leaves
        # once no process serves it (a follower does not count as a reload: one operator reload is 1).
        wait_until(lambda: metric(client, "msflow_model_info", category=CATEGORY, version="1") == 0, 60,
                   "every front end on version 2")
        assert metric(client, "msflow_model_reloads_total", category=CATEGORY, outcome="ok") == 1
        assert batch_counts(client) == dict.fromkeys(BATCH_SERIES, 0.0), "a warm-up was counted as a batch"

        # Only the version served is on /metrics (multi-process files kept version 1 at 0).
        for _ in range(3):
            info = {(s.labels["version"], s.value) for s in samples(client, "msflow_model_info")
                    if s.labels["category"] == CATEGORY}
            assert info == {("2", 1.0)}, info

        sent = 0
        for path in good_images[:5]:  # one at a time: every batch holds one image
            r = client.post(f"/v1/inspect/{CATEGORY}", files=[part(path)], params={"heatmap": "none"})
            assert r.status_code == 200 and r.json()["model_version"] == "2", r.text
            sent += 1
        counts = batch_counts(client)
        assert counts["msflow_batch_size_count"] == sent and counts["msflow_batch_size_sum"] == sent, counts
        assert counts["msflow_engine_seconds_count"] == sent and counts["msflow_queue_wait_seconds_count"] == sent
        if processes > 1:  # the engine process's own histogram: one front end fed each batch
            assert counts["msflow_batch_frontends_count"] == sent and counts["msflow_batch_frontends_sum"] == sent
    finally:
        server.stop()


def test_the_models_serving_panel_lists_only_versions_served() -> None:
    """The table's query kept every series of the info gauge, the retired ones (0) too: a
    replica that had reloaded showed the version it no longer serves as a row."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "msflow.json").read_text())
    (panel,) = [p for p in dashboard["panels"] if p.get("title") == "Models serving"]
    (target,) = panel["targets"]
    assert "msflow_model_info == 1" in target["expr"].replace("(", " ").replace(")", " "), target["expr"]


def test_queue_depth_stays_a_series_through_an_engine_process_restart(store: Path, tmp_path: Path,
                                                                      good_images: list[Path]) -> None:
    """The autoscaler and the dashboards read ``msflow_queue_depth``: a killed engine
    process's series left ``/metrics`` with it, and came back only with the first batch."""
    server = start(store, tmp_path / "server.log", api_processes=2, engine="onnx", store_poll_s=0,
                   max_batch_size=8, max_queue_delay_ms=5)
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        r = client.post(f"/v1/inspect/{CATEGORY}", files=[part(good_images[0])], params={"heatmap": "none"})
        assert r.status_code == 200, r.text
        engine = engine_pid(server.proc.pid)
        assert engine is not None
        batches = metric(client, "msflow_batch_size_count", category=CATEGORY)
        os.kill(engine, signal.SIGKILL)
        wait_until(lambda: engine_pid(server.proc.pid) not in (None, engine), 30, "a new engine process")

        def ready_everywhere() -> bool:  # both front ends connected again (each probe: a new connection)
            return all(httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200 for _ in range(8))
        wait_until(ready_everywhere, 60, "both front ends back on the new engine process", interval=0.2)
        for _ in range(3):
            depth = [s for s in samples(client, "msflow_queue_depth") if s.labels.get("category") == CATEGORY]
            assert [s.value for s in depth] == [0.0], depth
        assert metric(client, "msflow_batch_size_count", category=CATEGORY) == batches  # no batch since
    finally:
        server.stop()


@pytest.fixture
def stalling_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)  # never leave it stopped, whatever failed
    server.stop()


def test_a_readiness_probe_during_a_redis_stall_leaves_the_hot_path_on_redis(model_store: Path, tmp_path: Path,
                                                                             stalling_redis: RedisServer,
                                                                             good_images: list[Path]) -> None:
    server = start(model_store, tmp_path / "server.log", redis_url=stalling_redis.url, redis_prefix=PREFIX,
                   redis_breaker_s=30.0, max_queue_delay_ms=5)
    try:
        client = httpx.Client(base_url=server.url, timeout=30)
        assert client.get("/readyz").json()["redis"] == "ok"
        before = {store: metric(client, "msflow_heatmap_links_total", store=store) for store in ("redis", "memory")}
        errors = metric(client, "msflow_cache_requests_total", result="error")
        assert stalling_redis.proc is not None
        os.kill(stalling_redis.proc.pid, signal.SIGSTOP)  # hung, not gone: no answer, no reset
        try:
            started = time.monotonic()
            r = client.get("/readyz", timeout=3)  # a Kubernetes probe's budget
            took = time.monotonic() - started
        finally:
            os.kill(stalling_redis.proc.pid, signal.SIGCONT)
        assert r.status_code == 200 and r.json()["redis"] == "degraded", r.text
        assert took < 1.5, f"/readyz took {took:.2f} s with Redis hung"
        # Redis answers again: the next inspection uses it (cache, a link any replica serves).
        r = client.post(f"/v1/inspect/{CATEGORY}", files=[part(good_images[0])],
                        params={"heatmap": "url", "overlay": "true"})
        assert r.status_code == 200, r.text
        assert metric(client, "msflow_heatmap_links_total", store="redis") == before["redis"] + 1
        assert metric(client, "msflow_heatmap_links_total", store="memory") == before["memory"]
        assert metric(client, "msflow_cache_requests_total", result="error") == errors
        assert client.get(r.json()["results"][0]["heatmap"]["url"]).status_code == 200
        assert client.get("/readyz").json()["redis"] == "ok"
    finally:
        server.stop()
