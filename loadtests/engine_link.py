"""The engine process's link alone: what one image costs to cross it, against a local batcher.

    python -m loadtests.engine_link --store model_store [--in-flight 1 2 8] [--seconds 5] [--rounds 3]

A multi-process server (``MSFLOW_API_PROCESSES`` > 1) sends every image from a front end to
the engine process and back (:mod:`service.pipeline.engine_client`, :mod:`service.engine_core`):
a slot of shared memory each way, two messages, two processes woken. Through HTTP that cost
is a few tenths of a millisecond inside two milliseconds of a request, which a shared box
drifts by as much between windows (docs/performance-log.md). Here there is no HTTP and no
decode: this process submits one model input at a time from ``--in-flight`` coroutines and
reads each answer's map once (as the postprocess's map check does), either

* ``local``: to a :class:`~service.pipeline.batcher.Batcher` in this process, over the
  null engine, as one server process batches; or
* ``link``: through an :class:`~service.pipeline.engine_client.EngineClient` to a real
  engine process (the one ``msflow serve`` starts, here with the null engine),

and reports, per mode and in-flight count, images/s, mean batch size, and CPU and minor page
faults per image of this process (a front end's side) and of the engine process; beside them,
the CPU of a bare round trip between two processes (the kernel's floor under a message pair). The two
modes take turns in each round; the report gives medians. ``link`` minus ``local`` is what
the split costs per image, with nothing else in the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.procstat import Usage, own_usage, process_usage
from models.manifest import Manifest
from service.config import Settings
from service.engine_core import run_engine_process
from service.engines.factory import load_engine
from service.metrics import ServiceMetrics
from service.pipeline.batch_queue import Batched
from service.pipeline.batcher import Batcher
from service.pipeline.engine_client import EngineClient
from service.pipeline.batcher import engine_runner

_WARM_S = 1.0  # before each window: connections made, batches in their steady rhythm


@dataclass
class Window:
    mode: str
    in_flight: int
    images_per_s: float
    mean_batch: float
    client_cpu_ms: float  # this process (a front end's side), per image
    engine_cpu_ms: float  # the engine process, per image (0 for local)
    client_faults: float  # minor page faults per image
    engine_faults: float


async def _drive(submit: Callable[[np.ndarray], Any], in_flight: int, seconds: float, size: int,
                 engine_pid: int | None) -> tuple[float, float, float, float, float, float]:
    """Keep ``in_flight`` single-image submissions going; measure a window of ``seconds``."""
    tensor = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    done, batch_total, stop = 0, 0, False

    async def one_at_a_time() -> None:
        nonlocal done, batch_total
        while not stop:
            (future,) = submit(tensor)
            batched: Batched[tuple[float, np.ndarray]] = await future
            if not np.isfinite(batched.value[1]).all():  # read the map, as every answer does
                raise RuntimeError("non-finite map from the null engine")
            done += 1
            batch_total += batched.batch_size

    tasks = [asyncio.create_task(one_at_a_time()) for _ in range(in_flight)]
    await asyncio.sleep(_WARM_S)
    images0, batches0, started = done, batch_total, time.monotonic()
    client0, engine0 = own_usage(), process_usage(engine_pid) if engine_pid else Usage(0.0, 0)
    await asyncio.sleep(seconds)
    images, batched_images = done - images0, batch_total - batches0
    client1, engine1 = own_usage(), process_usage(engine_pid) if engine_pid else Usage(0.0, 0)
    elapsed = time.monotonic() - started
    stop = True
    await asyncio.gather(*tasks)
    n = max(1, images)
    return (images / elapsed, batched_images / n, (client1.cpu_s - client0.cpu_s) / n * 1e3,
            (engine1.cpu_s - engine0.cpu_s) / n * 1e3, (client1.minor_faults - client0.minor_faults) / n,
            (engine1.minor_faults - engine0.minor_faults) / n)


async def _local(version_dir: Path, settings: Settings, in_flight: int, seconds: float) -> Window:
    engine = load_engine(version_dir, kind="null", device="cpu", max_batch_size=settings.max_batch_size)
    batcher = Batcher(engine.manifest.category, engine_runner(engine), label=engine.name,
                      max_batch_size=settings.max_batch_size, max_queue_delay_s=settings.max_queue_delay_ms / 1e3,
                      max_queue_size=settings.max_queue_size, observer=ServiceMetrics())
    try:
        figures = await _drive(lambda t: batcher.submit_many([t], time.monotonic() + 10), in_flight, seconds,
                               engine.manifest.input_size, None)
    finally:
        await batcher.drain()
    return Window("local", in_flight, *figures)


async def _link(version_dir: Path, settings: Settings, socket_path: Path, engine_pid: int, in_flight: int,
                seconds: float) -> Window:
    client = EngineClient(settings, socket_path)
    client.start()
    try:
        hold, _ = await client.acquire(version_dir)
        manifest = Manifest.read(version_dir)
        figures = await _drive(lambda t: client.submit(manifest.category, hold, [t], time.monotonic() + 10),
                               in_flight, seconds, manifest.input_size, engine_pid)
    finally:
        await client.close()
    return Window("link", in_flight, *figures)


def bare_round_trip_us(trips: int = 20_000) -> tuple[float, float]:
    """CPU of one 40-byte message echoed by another process over a Unix socket, in µs: (this
    side, the echoing side). The kernel's floor under the link's cost per message pair."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo only: it takes no lock that a thread of the parent could have held
        ours.close()
        while data := theirs.recv(64):
            theirs.send(data)
        os._exit(0)
    theirs.close()
    before = os.times()
    for _ in range(trips):
        ours.send(b"x" * 40)
        ours.recv(64)
    after = os.times()
    ours.close()
    os.waitpid(pid, 0)
    child = os.times()
    return ((after.user + after.system - before.user - before.system) / trips * 1e6,
            (child.children_user + child.children_system - before.children_user - before.children_system)
            / trips * 1e6)


def _median_rows(windows: list[Window]) -> list[Window]:
    rows = []
    for key in dict.fromkeys((w.mode, w.in_flight) for w in windows):
        group = [w for w in windows if (w.mode, w.in_flight) == key]
        rows.append(Window(key[0], key[1], *(statistics.median(getattr(w, f) for w in group) for f in (
            "images_per_s", "mean_batch", "client_cpu_ms", "engine_cpu_ms", "client_faults", "engine_faults"))))
    return rows


def report(rows: list[Window], rounds: int, seconds: float, floor_us: tuple[float, float]) -> str:
    lines = [f"# The engine link alone (null engine, {seconds:g} s per window, medians of {rounds} rounds, "
             f"{os.cpu_count()} cores)", "",
             "| mode | in flight | images/s | mean batch | front-end side CPU / image | engine process CPU / image "
             "| total | minor faults / image (front end, engine) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in rows:
        lines.append(f"| {w.mode} | {w.in_flight} | {w.images_per_s:.0f} | {w.mean_batch:.2f} | "
                     f"{w.client_cpu_ms:.3f} ms | {w.engine_cpu_ms:.3f} ms | {w.client_cpu_ms + w.engine_cpu_ms:.3f} ms "
                     f"| {w.client_faults:.1f}, {w.engine_faults:.1f} |")
    lines.append("")
    for local in (w for w in rows if w.mode == "local"):
        link = next((w for w in rows if w.mode == "link" and w.in_flight == local.in_flight), None)
        if link is not None:
            lines.append(f"- {local.in_flight} in flight: the link costs "
                         f"{link.client_cpu_ms + link.engine_cpu_ms - local.client_cpu_ms:+.3f} ms per image")
    lines.append(f"- a bare round trip between two processes (a 40-byte message echoed over a Unix socket): "
                 f"{floor_us[0]:.1f} + {floor_us[1]:.1f} µs of CPU")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--category", default=None, help="default: the store's first category")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="reports/engine-link")
    args = parser.parse_args(argv)

    floor_us = bare_round_trip_us()  # first, before this process starts its own threads
    store = Path(args.store)
    category = args.category or sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    version_dir = max((p for p in (store / category).iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    rundir = Path(tempfile.mkdtemp(prefix="msflow-link-"))
    socket_path = rundir / "engine.sock"
    overrides: dict[str, Any] = {"model_store": str(store), "engine": "null", "device": "cpu", "api_processes": 2,
                                 "engine_socket": str(socket_path), "log_level": "warning"}
    settings = Settings(**overrides)
    engine_process = multiprocessing.get_context("spawn").Process(
        target=run_engine_process, args=(overrides, str(socket_path)), name="msflow-engine", daemon=True)
    engine_process.start()
    assert engine_process.pid is not None
    windows: list[Window] = []
    try:
        for round_ in range(1, args.rounds + 1):
            for in_flight in args.in_flight:
                windows.append(asyncio.run(_local(version_dir, settings, in_flight, args.seconds)))
                windows.append(asyncio.run(_link(version_dir, settings, socket_path, engine_process.pid, in_flight,
                                                 args.seconds)))
                print(f"round {round_}, {in_flight} in flight: " + "; ".join(
                    f"{w.mode} {w.client_cpu_ms + w.engine_cpu_ms:.3f} ms/image" for w in windows[-2:]), flush=True)
    finally:
        engine_process.terminate()
        engine_process.join(10)
        socket_path.unlink(missing_ok=True)
        rundir.rmdir()
    rows = _median_rows(windows)
    text = report(rows, args.rounds, args.seconds, floor_us)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"bare_round_trip_cpu_us": list(floor_us),
                                                  "windows": [asdict(w) for w in windows],
                                                  "medians": [asdict(w) for w in rows]}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
