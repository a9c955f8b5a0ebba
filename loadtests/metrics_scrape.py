"""What a ``/metrics`` scrape costs the event loop of the front end that answers it.

    python -m loadtests.metrics_scrape --store /tmp/ro/storeq [--categories 10] [--api-processes 1 2]

Builds a store of ``--categories`` categories (each a copy of the first version in
``--store``, its manifest renamed; the model file linked, never read: the null engine
serves), starts ``msflow serve`` on a free loopback port for each ``--api-processes``,
sends ``--requests`` inspections to every category (heatmap none and inline, a few refused
ones) so that every per-category series exists, then reports:

* ``exposition_ms``: :meth:`service.metrics.ServiceMetrics.exposition`'s work, timed in this
  process. One process: a :class:`ServiceMetrics` here given the same label sets as the
  server (the categories' observations replayed); several: prometheus-client's merge of
  the server's own files (``PROMETHEUS_MULTIPROC_DIR`` of its children), the part of a
  multi-process scrape that runs on the answering front end's loop;
* ``wakeup_ms``: beside that exposition built back to back in this process, how long the
  event loop takes to run a socket's reader after another process's data arrived (what a
  request in flight waits for): ``idle``, ``on_loop`` (the exposition in the coroutine, as
  ``/metrics`` built it before) and ``off_loop`` (``exposition_off_loop``, as it does now);
* ``scrape_ms``: a whole ``GET /metrics`` from outside, and the samples it holds;
* ``healthz_ms``: ``GET /healthz`` on its own connection, answered while no scrape runs and
  while one runs (one process: every request goes to the loop that builds the exposition;
  several: the kernel spreads connections, so only some probes share a loop with a scrape).

Medians and maxima over ``--scrapes`` scrapes; JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from loadtests.procstat import tree
from loadtests.run import LocalServer, listens, wait_ready


def build_store(source: Path, root: Path, categories: int) -> list[str]:
    """``categories`` categories under ``root``, each the source's first version renamed."""
    from models.manifest import Manifest

    version_dir = sorted(p for p in source.glob("*/*") if (p / "manifest.json").exists())[0]
    names = [f"cat{i:02d}" for i in range(categories)]
    for name in names:
        folder = root / name / "1"
        folder.mkdir(parents=True)
        for item in version_dir.iterdir():
            if item.name != "manifest.json":
                (folder / item.name).symlink_to(item.resolve())
        Manifest.read(version_dir).model_copy(update={"category": name, "version": "1"}).write(folder)
    return names


def png(size: int = 256) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 90, 60)).save(buf, format="PNG")
    return buf.getvalue()


def traffic(url: str, categories: list[str], requests: int) -> None:
    """Every category's series: inspections with and without a heatmap, a refused image, an
    unknown category; spread over connections so that every front end counts some."""
    data, bad = png(), b"not an image"
    for round_ in range(requests):
        with httpx.Client(base_url=url, timeout=60) as client:  # a new connection: another front end
            for category in categories:
                heatmap = "inline" if round_ % 4 == 0 else "none"
                r = client.post(f"/v1/inspect/{category}", params={"heatmap": heatmap},
                                files=[("file", ("a.png", data, "image/png"))])
                r.raise_for_status()
                if round_ == 0:
                    client.post(f"/v1/inspect/{category}", files=[("file", ("b.png", bad, "image/png"))])
            if round_ == 0:
                client.post("/v1/inspect/nope", files=[("file", ("a.png", data, "image/png"))])
                client.get("/readyz")
                client.get("/v1/models")


def multiproc_dir(pid: int) -> str:
    """The ``PROMETHEUS_MULTIPROC_DIR`` the supervisor gave its children."""
    for child in tree(pid):
        if child == pid:
            continue
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in env:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                return entry.split(b"=", 1)[1].decode()
    raise RuntimeError("no child of the server has PROMETHEUS_MULTIPROC_DIR")


def time_merge(directory: str, repeats: int) -> tuple[list[float], dict[str, Any]]:
    """The multi-process exposition over ``directory``'s files, as the front end builds it,
    and the wake-up delays beside it."""
    from service.metrics import ServiceMetrics

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        metrics = ServiceMetrics()
        return [_timed(metrics.exposition) for _ in range(repeats)], wakeups_beside(metrics)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]


# Another process sends its CLOCK_MONOTONIC every 2-3 ms: a request's arrival, which no thread
# of this process (holding the GIL or waiting for it) can delay the stamping of.
_SENDER = """
import random, socket, struct, sys, time
out = socket.socket(fileno=int(sys.argv[1]))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    time.sleep(0.002 + random.random() * 0.001)
    out.send(struct.pack("d", time.monotonic()))
"""


def wakeups_beside(metrics: Any, seconds: float = 3.0) -> dict[str, Any]:
    """How long an event loop takes to run a socket's reader after the data arrived (ms), while
    it builds expositions back to back (10 ms apart): ``idle`` (none), ``on_loop`` (the route
    before: ``exposition()`` in the coroutine), ``off_loop`` (``exposition_off_loop()``)."""
    async def idle() -> None:
        return None

    async def on_loop() -> None:
        metrics.exposition()

    async def off_loop() -> None:
        await metrics.exposition_off_loop()

    return {name: _summary(asyncio.run(_delays(build, seconds)))
            for name, build in (("idle", idle), ("on_loop", on_loop), ("off_loop", off_loop))}


async def _delays(build: Any, seconds: float) -> list[float]:
    receiver, sender = socket.socketpair()
    receiver.setblocking(False)
    delays: list[float] = []

    def readable() -> None:
        data, now = receiver.recv(65536), time.monotonic()
        delays.extend((now - struct.unpack_from("d", data, i)[0]) * 1000 for i in range(0, len(data) - 7, 8))
    loop = asyncio.get_running_loop()
    loop.add_reader(receiver.fileno(), readable)
    proc = subprocess.Popen([sys.executable, "-c", _SENDER, str(sender.fileno()), str(seconds)],
                            pass_fds=[sender.fileno()])
    try:
        while proc.poll() is None:
            await build()
            await asyncio.sleep(0.01)
    finally:
        loop.remove_reader(receiver.fileno())
        receiver.close()
        sender.close()
    return delays


def time_one_process(text: str, repeats: int) -> tuple[list[float], int, dict[str, Any]]:
    """One process's exposition with the label sets ``text`` (a scrape of the server) holds,
    and the wake-up delays beside it."""
    metrics = replayed(text)
    samples = _samples(metrics.exposition()[0].decode())
    return [_timed(metrics.exposition) for _ in range(repeats)], samples, wakeups_beside(metrics)


def replayed(text: str) -> Any:
    """A :class:`~service.metrics.ServiceMetrics` of this process with the label sets ``text``
    (a scrape of the server) holds, each series given one observation of its own kind."""
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    by_name = {family.name: metric for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)
               for family in metric.describe()}
    for family in text_string_to_metric_families(text):
        metric = by_name.get(family.name)
        if metric is None:
            continue
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            if set(labels) != set(metric._labelnames):  # noqa: SLF001
                continue
            child = metric.labels(**labels) if labels else metric
            if family.type in ("histogram",):
                child.observe(0.01)
            elif family.type == "counter":
                child.inc()
            else:
                child.set(sample.value)
    return metrics


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _samples(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def probe_during_scrapes(url: str, scrapes: int) -> dict[str, Any]:
    """``/healthz`` latencies while no scrape runs and while one does, and the scrapes' own."""
    scraping = threading.Event()
    done = threading.Event()
    idle: list[float] = []
    during: list[float] = []

    def probe(client: httpx.Client) -> None:
        while not done.is_set():
            overlapped = scraping.is_set()
            start = time.perf_counter()
            client.get("/healthz").raise_for_status()
            ms = (time.perf_counter() - start) * 1000
            (during if overlapped or scraping.is_set() else idle).append(ms)
            time.sleep(0.0005)

    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(4)]
    threads = [threading.Thread(target=probe, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    scrape_ms: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as scraper:
        for _ in range(scrapes):
            time.sleep(0.05)
            scraping.set()
            start = time.perf_counter()
            scraper.get("/metrics").raise_for_status()
            scrape_ms.append((time.perf_counter() - start) * 1000)
            scraping.clear()
    done.set()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    return {"scrape_ms": _summary(scrape_ms), "healthz_idle_ms": _summary(idle),
            "healthz_during_scrape_ms": _summary(during)}


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"n": len(values), "median": round(statistics.median(values), 3),
            "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
            "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 3), "max": round(max(values), 3)}


def measure(store: Path, categories: list[str], processes: int, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    env = {"MSFLOW_ENGINE": "null", "MSFLOW_DEVICE": "cpu", "MSFLOW_ACCESS_LOG": "false",
           "MSFLOW_LOG_LEVEL": "warning", "MSFLOW_STORE_POLL_S": "0", "MSFLOW_DECODE_THREADS": "2",
           "MSFLOW_API_PROCESSES": str(processes)}
    with LocalServer(str(store), log, env=env) as server:
        wait_ready(server.url, server.proc, 120)
        assert server.proc is not None
        while sum(listens(pid, server.port) for pid in tree(server.proc.pid)) < processes:
            time.sleep(0.2)
        traffic(server.url, categories, args.requests)
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        result: dict[str, Any] = {"api_processes": processes, "samples": _samples(text),
                                  "metrics_bytes": len(text)}
        if processes > 1:
            times, wakeups = time_merge(multiproc_dir(server.proc.pid), args.scrapes)
        else:
            times, result["replayed_samples"], wakeups = time_one_process(text, args.scrapes)
        result["exposition_ms"] = _summary(times)
        result["wakeup_ms"] = wakeups
        result.update(probe_during_scrapes(server.url, args.scrapes))
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.metrics_scrape", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a model store: its first version is copied per category")
    p.add_argument("--categories", type=int, default=10)
    p.add_argument("--api-processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=8, help="inspections per category")
    p.add_argument("--scrapes", type=int, default=50)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="metrics-scrape-") as tmp:
        root = Path(tmp)
        categories = build_store(Path(args.store), root / "store", args.categories)
        results = [measure(root / "store", categories, n, args, root / f"server-{n}.log")
                   for n in args.api_processes]
    print(json.dumps({"categories": args.categories, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
