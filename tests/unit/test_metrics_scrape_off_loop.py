"""``/metrics`` builds its exposition in a thread, one at a time: on the event loop a scrape of
a server with ten categories held every request in flight for its whole build (milliseconds;
the multi-process merge more), and a burst of scrapes for one build each, in turn."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from harness import loop_gaps_during
from service import metrics_multiprocess
from service.api import health
from service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parents[2]


class RecordingCollector:
    """A collector of the service's registry that records who collects it and when: the
    thread, how many collect at once, and what it reads (a value the test moves)."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self.threads: list[int] = []
        self.calls = self.inside = self.most_inside = 0
        self.value = 0.0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:  # so that registering it does not collect it
        return [GaugeMetricFamily("test_recorded", "what the test set")]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self.threads.append(threading.get_ident())
            self.calls += 1
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            value = self.value
        self.entered.set()
        try:
            self.gate.wait(10)
            time.sleep(self.hold_s)  # a large exposition's build
            yield GaugeMetricFamily("test_recorded", "what the test set", value=value)
        finally:
            with self._lock:
                self.inside -= 1


def app_with(collector: RecordingCollector) -> FastAPI:
    """The health routes over a state with no Redis and no engine process (one process)."""
    metrics = ServiceMetrics()
    metrics.registry.register(collector)  # type: ignore[arg-type]
    app = FastAPI()
    app.include_router(health.router)
    app.state.service = SimpleNamespace(jobs=None, engine_link=None, metrics=metrics)
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_the_exposition_is_built_off_the_event_loop() -> None:
    collector = RecordingCollector(hold_s=0.2)

    async def main() -> tuple[int, list[float]]:
        async def scrape() -> httpx.Response:
            async with client(app_with(collector)) as c:
                return await c.get("/metrics")
        r, gaps = await loop_gaps_during(scrape)
        assert r.status_code == 200 and "test_recorded 0.0" in r.text
        return threading.get_ident(), gaps

    loop_thread, gaps = asyncio.run(main())
    assert collector.threads and loop_thread not in collector.threads
    assert max(gaps) < 0.1, f"the event loop stood still for {max(gaps):.3f} s during a scrape"


def test_concurrent_scrapes_build_one_exposition_at_a_time_and_share_it() -> None:
    collector = RecordingCollector(hold_s=0.05)

    async def main() -> list[httpx.Response]:
        async with client(app_with(collector)) as c:
            return await asyncio.gather(*(c.get("/metrics") for _ in range(20)))

    answers = asyncio.run(main())
    assert all(r.status_code == 200 and "test_recorded" in r.text for r in answers)
    assert collector.most_inside == 1
    # The first scrape's build, and one more for the 19 that arrived while it ran.
    assert collector.calls <= 2, f"{collector.calls} builds for 20 concurrent scrapes"


def test_a_scrape_during_a_build_reads_values_from_after_its_arrival() -> None:
    """It waits for the running build and takes the next: the running one read the values
    before this scrape came (and before its own flush, in multi-process mode)."""
    collector = RecordingCollector()
    collector.gate.clear()

    async def main() -> tuple[str, str]:
        async with client(app_with(collector)) as c:
            first = asyncio.create_task(c.get("/metrics"))
            while not collector.entered.is_set():
                await asyncio.sleep(0.005)
            collector.value = 7.0  # counted after the first build read it
            second = asyncio.create_task(c.get("/metrics"))
            await asyncio.sleep(0.05)
            collector.gate.set()
            return (await first).text, (await second).text

    first, second = asyncio.run(main())
    assert "test_recorded 0.0" in first
    assert "test_recorded 7.0" in second


def test_a_scraper_gone_does_not_cancel_the_build_the_others_wait_for() -> None:
    collector = RecordingCollector()
    collector.gate.clear()

    async def main() -> tuple[bytes, str]:
        metrics = app_with(collector).state.service.metrics
        gone = asyncio.create_task(metrics.exposition_off_loop())
        staying = asyncio.create_task(metrics.exposition_off_loop())
        while not collector.entered.is_set():
            await asyncio.sleep(0.005)
        gone.cancel()
        collector.gate.set()
        return await staying

    body, _ = asyncio.run(main())
    assert b"test_recorded 0.0" in body and collector.calls == 1


# One process of a server: a front end's and an engine process's kinds of series, in several
# categories, gauges of every mode the service uses; flushed at exit.
_A_PROCESS = """
import sys
import service.metrics as m
metrics = m.ServiceMetrics()
offset = int(sys.argv[1])
for i in range(40):
    category = f"cat{i % 4}"
    metrics.observe_request("/v1/inspect/{category}", category, 200 if i % 7 else 503, 0.001 * (i + offset))
    metrics.count_image(category, i % 3 == 0, "ng" if i % 3 == 0 else "ok")
    metrics.observe_score(category, (i % 20) / 20)
    metrics.observe_batch(category, "null", 1 + i % 5, 0.002 * i)
    metrics.set_queue_depth(category, i % 3 + offset)
    metrics.set_anomaly_window(category, i % 5, 10)
    metrics.set_job_census(category, offset, i)
    metrics.set_model(category, str(1 + i % 2), "null")
"""


def test_the_merge_in_pieces_gives_the_librarys_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for offset in (1, 2, 3):  # three processes' files
        subprocess.run([sys.executable, "-c", _A_PROCESS, str(offset)], cwd=REPO, env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert metrics_multiprocess._PIECEWISE  # the installed prometheus-client has both steps
    whole = list(MultiProcessCollector(None).collect())
    pieces = list(metrics_multiprocess._merged(0.0001))
    assert [(f.name, f.type, f.documentation) for f in pieces] == [(f.name, f.type, f.documentation) for f in whole]
    def samples(families: list[Metric]) -> list[list[tuple[str, str, float]]]:
        return [sorted((s.name, repr(sorted(s.labels.items())), s.value) for s in f.samples) for f in families]
    assert samples(pieces) == samples(whole) and sum(map(len, samples(whole))) > 300
    assert generate_latest(metrics_multiprocess.merged_view(0.0001)) == generate_latest(metrics_multiprocess.merged_view())
