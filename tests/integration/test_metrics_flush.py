"""Multi-process mode keeps metric values in each process's memory and writes them to the
shared files once a second (service/metrics_buffer.py); a scrape has every process write
first, so ``/metrics`` right after a burst of requests over two front ends reads exact totals,
and a front end that drains and exits leaves every value it counted in its files."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from harness import CATEGORY, Server, children, free_port, part, start, wait_until

INSPECT = "/v1/inspect/{category}"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One /metrics, every sample by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(value for (sample, got), value in samples.items()
               if sample == name and all((k, v) in got for k, v in labels.items()))


def burst(url: str, paths: list[Path], count: int) -> list[httpx.Response]:
    """``count`` requests at once, each on its own connection (the kernel spreads them over the front ends)."""
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/inspect/{CATEGORY}", files=[part(paths[i % len(paths)])],
                          params={"heatmap": "none"}, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def front_ends(server: Server) -> set[int]:
    return {pid for pid, name in children(server.proc.pid).items() if name.startswith("msflow-api-")}


@pytest.fixture
def server(model_store: Path, tmp_path: Path) -> Iterator[Server]:
    server = start(model_store, tmp_path / "server.log", api_processes=2, engine="onnx", max_batch_size=8,
                   max_queue_delay_ms=20)
    yield server
    server.stop()


def test_a_scrape_right_after_a_burst_over_two_front_ends_reads_exact_totals(server: Server,
                                                                             good_images: list[Path]) -> None:
    assert len(front_ends(server)) == 2
    before = scrape(server.url)
    sent = 0
    for _ in range(3):  # each scrape straight after its burst: no periodic flush can have come between
        answers = burst(server.url, good_images, 24)
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        sent += len(answers)
        after = scrape(server.url)
        for name, labels in (("msflow_requests_total", {"endpoint": INSPECT, "status": "200"}),
                             ("msflow_request_duration_seconds_count", {"endpoint": INSPECT}),
                             ("msflow_images_total", {"category": CATEGORY}),
                             ("msflow_score_count", {"category": CATEGORY}),
                             # the engine process's: images over its batches, and per image waits
                             ("msflow_batch_size_sum", {"category": CATEGORY}),
                             ("msflow_queue_wait_seconds_count", {"category": CATEGORY})):
            assert total(after, name, **labels) - total(before, name, **labels) == sent, name
    # Every engine batch was counted as its images were (its count, its buckets' top).
    assert total(after, "msflow_batch_size_count") == total(after, "msflow_batch_size_bucket", le="+Inf")


def test_front_ends_stopped_right_after_a_burst_leave_every_count_in_their_files(
        server: Server, good_images: list[Path]) -> None:
    before = scrape(server.url)
    answers = burst(server.url, good_images, 24)
    assert all(r.status_code == 200 for r in answers)
    stopped = front_ends(server)
    for pid in stopped:  # each writes what it holds as it exits (a drain): no scrape asks it first
        os.kill(pid, signal.SIGTERM)

    def replaced() -> bool:
        now = front_ends(server)
        if len(now) != 2 or now & stopped:
            return False
        try:  # refused while neither listens
            return httpx.get(f"{server.url}/readyz").status_code == 200
        except httpx.TransportError:
            return False
    wait_until(replaced, 60, "two new front ends serving")
    after = scrape(server.url)
    for name, labels in (("msflow_requests_total", {"endpoint": INSPECT, "status": "200"}),
                         ("msflow_images_total", {"category": CATEGORY}),
                         ("msflow_score_count", {"category": CATEGORY})):
        assert total(after, name, **labels) - total(before, name, **labels) == len(answers), name


# A front end's own process, as the supervisor runs it, but with the periodic flush an hour
# away: what reaches the files at exit is then only what the exit path writes.
_FRONT_END = """
import sys
from service import metrics_buffer
metrics_buffer.FLUSH_INTERVAL_S = 3600.0
from service.config import Settings
from service.server import run_server
sys.exit(run_server(Settings(model_store=sys.argv[1], port=int(sys.argv[2]), shutdown_delay_s=0)))
"""


def test_a_front_end_stopped_by_sigterm_writes_its_values_before_it_dies(model_store: Path, tmp_path: Path) -> None:
    """uvicorn re-raises the SIGTERM it drained for once it has shut down, and with the default
    handler back the process dies of it there: ``atexit`` never runs. What the process counted
    since its last write was lost (a drained front end's last second: 18 of 24 requests on a
    loaded box), unless something writes it before uvicorn lets the signal through."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "MSFLOW_REDIS_URL": "", "MSFLOW_ENGINE": "onnx"}
    proc = subprocess.Popen([sys.executable, "-c", _FRONT_END, str(model_store), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(ready, 120, "the server ready")
        # Past the start-up's last new series (a new series writes what was counted before it),
        # so that what the requests below count can reach the files only by the exit's own write.
        time.sleep(1.5)
        for _ in range(4):  # the first makes the route's series, which writes what was counted before it
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == -signal.SIGTERM  # as a drained front end ends: by its signal
    finally:
        if proc.poll() is None:
            proc.kill()
    counted = sum(s.value for family in MultiProcessCollector(None, path=str(metrics_dir)).collect()
                  for s in family.samples
                  if s.name == "msflow_requests_total" and s.labels.get("endpoint") == "/healthz")
    assert counted == 4
