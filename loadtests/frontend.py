"""Front-end benchmark: server CPU per image and images/s with the engine's cost removed.

    python -m loadtests.frontend --store model_store                 # null engine (zero outputs)
    python -m loadtests.frontend --store model_store --engine onnx   # the real engine, same inputs

Starts ``msflow serve`` on a free loopback port with ``MSFLOW_ENGINE=null`` (the benchmark
engine, :mod:`service.engines.null`), then for each input kind drives it at saturation from
a lean asyncio + httpx client (``--concurrency`` requests in flight, one image each) for
``--seconds``, and reports per kind:

* server CPU per image (``/proc/<pid>/stat`` utime + stime, all threads, over the window);
* images/s and the server's cores used;
* the client's own CPU per image (this process, ``getrusage``): on a small box the client
  competes with the server, so every throughput figure comes with it;
* the answers' own stage times (decode, render + regions: wall time in the pool threads);
* the cycle collector's passes in the window, by process and generation (the server's
  ``msflow_gc_pause_seconds``, scraped before and after it; each process reports its passes
  once a second, so the window's edges are a second fuzzy);
* where the CPU goes (``--profile``, on by default; :mod:`loadtests.frontend_profile`):
  each stage run in this process, alone,
  on the same input, timed with ``time.thread_time`` over many repetitions: multipart
  parsing, header probe, decode, resize to the model input, regions, heatmap encode, base64,
  JSON (regions and heatmap from the map the engine gives this image: flat for the null
  engine, the model's with ``--engine onnx``). What the server spends beyond their sum is the
  framework, the event loop and batching (the table shows it as "other").

With ``--engine onnx`` (the real engine) it also reports what the server spends outside the
engine, against the engine's own CPU, two ways: *by thread* (the server's threads named
``engine-*``, :mod:`service.os_names`: the batcher's engine thread and onnxruntime's pool,
against every other thread), and *against the bare engine* (server CPU minus the engine
alone in this process, at the batch sizes the server formed, weighted by its images, measured
right after each round while the server idles: this also charges the engine's slow-down
beside the server's other threads to the outside).

Kinds: ``jpeg256-none`` (a 256 x 256 JPEG, ``heatmap=none``), ``png256-inline`` (a 256 x 256
PNG, inline heatmap), ``jpeg2048-none`` (a 2048 x 2048 camera-like JPEG, ``heatmap=none``): the
issue's three targets, run by default; and ``png256-overlay`` (the PNG, its inline heatmap
blended over it: ``overlay=true``), on request (:mod:`loadtests.frontend_inputs`). Each made
from scikit-image's brick photograph, or from ``--image``. The image matters with the real
engine: a model of the category finds the texture photograph (another scale than its parts)
defective all over, a good part of the category mostly not, and an answer's defect regions
cost with the defect's size.
``--servers N`` runs N separate single-process servers instead of one and spreads the
connections over them: the same work split over N processes with no link between them, so
the floor under ``--api-processes N`` on the same box (more busy processes than cores cost
CPU per image by themselves: caches, wake-ups, scheduling).
``--redis`` serves with a ``redis-server`` of its own (the result cache, heatmap links), and
``--distinct`` makes every request's bytes differ (not its pixels), so that the cache misses
as on a line; ``--review-items N`` serves with a review store already holding N items (a busy line's
store is full: every audited answer is checked against it).
``--rate R`` offers R images a second instead of saturating the server (an open loop, evenly
spaced, at most ``--concurrency`` in flight): the modes compared at one load below
saturation, as on a host with cores to spare, where a process's CPU per image depends on how
busy it is. ``--device cuda`` serves a real engine on a GPU host's GPU (the server is on the
CPU otherwise).
``--rounds N`` drives every kind N times, the kinds taking turns, and reports the median of
each figure (the share outside the engine of each round, too): on a shared box a single
window drifts by about as much as the 10% target's margin (docs/performance-log.md).
Writes ``summary.json`` and ``summary.md`` (:mod:`loadtests.frontend_report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtests.frontend_inputs import KINDS, TARGET_KINDS, distinct, encoded, source, texture
from loadtests.frontend_profile import bare_engine_cpu_ms, outside_the_engine, profile
from loadtests.frontend_wrk import drive_wrk, wrk_path
from loadtests.frontend_report import combine, render, server_figures, window_metrics
from loadtests.procstat import own_cpu_s, tree, trees_usage
from loadtests.redis_proc import RedisProc
from loadtests.review_fill import fill
from loadtests.run import LocalServer, listens, wait_ready


async def drive(targets: Sequence[tuple[str, int]], category: str, data: bytes, content_type: str,
                query: dict[str, str], concurrency: int, seconds: float, unique: bool = False,
                rate: float | None = None) -> dict[str, Any]:
    """Drive ``targets`` (each a server's URL and the pid of its process tree) at saturation:
    ``concurrency`` connections, one request in flight on each, spread over the targets in
    turn; CPU is summed over every target's tree. ``unique``: every request's bytes differ
    (:func:`distinct`). ``rate``: instead, an open loop at that many requests a second, evenly
    spaced (as cameras on a line send, whether or not the server keeps up), never more than
    ``concurrency`` in flight; each answer's wait counts from when it was due."""
    timings: list[dict[str, float]] = []
    sent_count = itertools.count()
    waits: list[float] = []  # each answer's wall time at the client: the tail shows the server's stalls
    failures = 0
    pids = [pid for _, pid in targets]
    per_target = -(-concurrency // len(targets))
    limits = httpx.Limits(max_connections=per_target, max_keepalive_connections=per_target)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30, limits=limits))
                   for url, _ in targets]
        answered = [0] * len(clients)  # answers by server, counted again from the window's start

        async def one(server: int, due: float | None = None) -> None:
            nonlocal failures
            sent = time.perf_counter() if due is None else due
            body = distinct(data, next(sent_count)) if unique else data
            r = await clients[server].post(f"/v1/inspect/{category}", params=query, content=body,
                                  headers={"Content-Type": content_type})
            if r.status_code != 200:
                failures += 1
                return
            result = r.json()["results"][0]
            waits.append((time.perf_counter() - sent) * 1e3)
            timings.append({**result["timings_ms"], "batch_size": result["batch_size"], "answer_bytes": len(r.content)})
            answered[server] += 1

        slots, in_flight = asyncio.Semaphore(concurrency), set[asyncio.Task[None]]()

        async def loop(until: float) -> None:
            if rate is not None:
                return await paced(until)
            await asyncio.gather(*(connection(i % len(clients), until) for i in range(concurrency)))

        async def paced(until: float) -> None:
            start = time.perf_counter()
            stop = start + until - time.monotonic()
            assert rate is not None
            for n in itertools.count():
                due = start + n / rate
                if due >= stop:
                    break
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
                await slots.acquire()  # a server that falls behind holds the rate down: images/s shows it
                task = asyncio.create_task(one(n % len(clients), due))
                in_flight.add(task)
                task.add_done_callback(answered_one)
            await asyncio.gather(*in_flight)

        def answered_one(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            slots.release()

        async def connection(server: int, until: float) -> None:
            while time.monotonic() < until:
                await one(server)

        async def scrape() -> list[str]:
            return [(await c.get("/metrics")).text for c in clients]

        await loop(time.monotonic() + 1.0)  # warm-up
        timings.clear()
        waits.clear()
        answered = [0] * len(clients)
        metrics0 = await scrape()  # outside the CPU window
        usage0 = trees_usage(pids)  # one pass over /proc per edge: CPU by process, thread and role; switches
        client0, t0 = own_cpu_s(), time.monotonic()
        await loop(t0 + seconds)
        wall, spent, own = time.monotonic() - t0, trees_usage(pids) - usage0, own_cpu_s() - client0
        passes, cache = window_metrics(metrics0, await scrape())
    n = len(timings)
    mean = {k: float(np.mean([t[k] for t in timings])) if n else float("nan") for k in
            ("decode", "render", "queue", "engine", "total")}
    return {"images": n, "failures": failures, "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
            **({"offered_per_s": rate} if rate is not None else {}),
            **server_figures(spent, n, wall), "client_cpu_ms_per_image": round(own / max(n, 1) * 1e3, 2),
            "decode_ms": round(mean["decode"], 2), "render_regions_ms": round(mean["render"], 2),
            "engine_ms_per_batch": round(mean["engine"], 2), "queue_ms": round(mean["queue"], 2),
            "latency_ms": round(mean["total"], 2),
            "client_latency_ms": {name: round(float(np.percentile(waits, q)), 2) if waits else float("nan")
                                  for name, q in (("p50", 50), ("p99", 99), ("p99.9", 99.9), ("max", 100))},
            "mean_batch": round(float(np.mean([t["batch_size"] for t in timings])), 2) if n else 0.0,
            # the JSON answer's size (an inline heatmap's base64 is most of it)
            "answer_bytes": round(float(np.mean([t["answer_bytes"] for t in timings]))) if n else 0,
            # images by the size of the batch they ran in
            "batch_mix": {int(b): int(c) for b, c in zip(*np.unique([int(t["batch_size"]) for t in timings],
                                                                     return_counts=True))},
            "collector_passes": passes,
            # the result cache's lookups in the window (msflow_cache_requests_total), with --redis
            **({"cache_lookups": cache} if any(cache.values()) else {}),
            **({"images_by_server": answered} if len(targets) > 1 else {}),
            }


def every_front_end_ready(url: str, pid: int, processes: int, timeout: float = 120.0) -> list[dict[str, Any]]:
    """The loaded models, once ``processes`` processes of the server listen on its port: a
    front end of a multi-process server joins the port only when it serves, so a window
    opened before the last one joined would measure fewer front ends than asked for."""
    port = int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while sum(listens(proc, port) for proc in tree(pid)) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: fewer than {processes} processes listening after {timeout:.0f} s")
        time.sleep(0.2)
    with httpx.Client(base_url=url) as c:
        models = c.get("/v1/models").json()
    return list(models["models"] if isinstance(models, dict) and "models" in models else models)


BATCH, DELAY_MS, DECODE_THREADS = 8, 2.0, 2  # the benchmarks' server settings unless told otherwise


def server_env(engine: str, device: str, api_processes: int, batch: int = BATCH, delay_ms: float = DELAY_MS,
               decode_threads: int = DECODE_THREADS) -> dict[str, str]:
    """The settings a benchmark's ``msflow serve`` runs with (quiet, no store polling): every
    benchmark of the front end (this one, loadtests/instructions.py) measures one server."""
    return {"MSFLOW_ENGINE": engine, "MSFLOW_DEVICE": device, "MSFLOW_ACCESS_LOG": "false",
            "MSFLOW_LOG_LEVEL": "warning", "MSFLOW_STORE_POLL_S": "0", "MSFLOW_DECODE_THREADS": str(decode_threads),
            "MSFLOW_MAX_BATCH_SIZE": str(batch), "MSFLOW_MAX_QUEUE_DELAY_MS": str(delay_ms),
            "MSFLOW_API_PROCESSES": str(api_processes)}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"reports/frontend-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    out.mkdir(parents=True, exist_ok=True)
    env = server_env(args.engine, args.device, args.api_processes, args.batch, args.delay_ms, args.decode_threads)
    if args.intra_op_threads:
        env["MSFLOW_INTRA_OP_THREADS"] = str(args.intra_op_threads)
    if args.loop_work_pixels is not None:
        env["MSFLOW_LOOP_WORK_PIXELS"] = str(args.loop_work_pixels)
    if args.access_log:
        env.update({"MSFLOW_ACCESS_LOG": "true", "MSFLOW_LOG_LEVEL": "info"})
    if args.servers > 1 and args.api_processes > 1:
        raise SystemExit("--servers N runs N single-process servers: leave --api-processes at 1")
    if args.client == "wrk":
        wrk_path()  # installed, or a clear error before any server starts
        if args.rate or args.distinct or (args.engine == "onnx" and args.device == "cpu"):
            raise SystemExit("--client wrk saturates the server with the same bytes and reads no answers: "
                             "--rate, --distinct and the real engine's split on the CPU need the httpx client")
    results: dict[str, Any] = {}
    review_held: tuple[int, int] | None = None
    with contextlib.ExitStack() as stack:
        if args.redis:  # the result cache and heatmap links in a real Redis, as deployed
            redis_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="msflow-redis-")))
            env["MSFLOW_REDIS_URL"] = stack.enter_context(RedisProc(redis_dir)).url
        if args.review_items:  # a full review store, as a busy line's server has one
            review_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="msflow-review-")))
            fill_category = args.category or sorted(p.name for p in Path(args.store).iterdir()
                                                    if p.is_dir() and not p.name.startswith("."))[0]
            review_held = fill(review_root, fill_category, args.review_items, args.review_labels)
            env["MSFLOW_REVIEW_STORE"] = str(review_root)
        servers = [stack.enter_context(LocalServer(args.store, out / f"server{i or ''}.log", env=env))
                   for i in range(args.servers)]  # started together, then waited for
        for each in servers:
            wait_ready(each.url, each.proc, timeout=180)
            assert each.proc is not None
            infos = every_front_end_ready(each.url, each.proc.pid, args.api_processes)
        targets = [(each.url, each.proc.pid) for each in servers if each.proc is not None]
        server = servers[0]
        category = args.category or sorted(m["category"] for m in infos)[0]
        with httpx.Client(base_url=server.url) as c:
            info = c.get(f"/v1/models/{category}").json()
        input_size, served_engine = info["input_size"], info["engine"]
        posts = {kind: (KINDS[kind], encoded(source(args.image, KINDS[kind].side), KINDS[kind].format))
                 for kind in args.kinds}
        rounds: dict[str, list[dict[str, Any]]] = {kind: [] for kind in args.kinds}

        def bare_engine(batch: int) -> float:
            return bare_engine_cpu_ms(Path(args.store), category, batch, texture(input_size),
                                      seconds=min(4.5, args.seconds), threads=args.intra_op_threads)

        for _ in range(args.rounds):  # the kinds take turns, so a drift of the box reaches each alike
            this_round = []
            for kind, (shape, data) in posts.items():
                r = (drive_wrk(targets, category, data, shape.content_type, shape.query, args.concurrency,
                               args.seconds)
                     if args.client == "wrk" else
                     asyncio.run(drive(targets, category, data, shape.content_type, shape.query, args.concurrency,
                                       args.seconds, unique=args.distinct, rate=args.rate)))
                rounds[kind].append(r)
                this_round.append(r)
            if args.engine == "onnx" and args.device == "cpu":  # outside the engine, against the engine's own CPU
                bare: dict[int, float] = {}  # batch size -> the bare engine's CPU per image, measured after the round
                for r in this_round:
                    outside_the_engine(r, bare, bare_engine)
        for kind, (shape, data) in posts.items():
            results[kind] = combine(rounds[kind])
            results[kind]["bytes"] = len(data)
            if args.profile:
                with httpx.Client(base_url=server.url, timeout=30) as c:
                    sample = c.post(f"/v1/inspect/{category}", params=shape.query,
                                    files=[("file", ("x", data, shape.content_type))]).text
                results[kind]["profile_ms"] = profile(Path(args.store), category, data, shape.heatmap, sample,
                                                      engine=args.engine, overlay=shape.overlay)
                stages = sum(results[kind]["profile_ms"].values())
                results[kind]["profile_ms"]["other"] = round(results[kind]["server_cpu_ms_per_image"] - stages, 3)
    summary = {"engine": args.engine, "device": args.device, "served_engine": served_engine, "category": category,
               "input_size": input_size, "client": args.client, "concurrency": args.concurrency, "rate": args.rate,
               "seconds": args.seconds, "rounds": args.rounds, "batch": args.batch, "decode_threads": args.decode_threads,
               "intra_op_threads": args.intra_op_threads, "loop_work_pixels": args.loop_work_pixels,
               "api_processes": args.api_processes, "servers": args.servers, "redis": args.redis,
               "distinct": args.distinct,
               "review_store": None if review_held is None else {"items": review_held[0], "labelled": review_held[1]},
               "image": args.image or "skimage brick texture",
               "cpu_count": os.cpu_count(), "kinds": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = render(summary)
    (out / "summary.md").write_text(md)
    print(md)
    return 0 if all(r["failures"] == 0 and r["images"] > 0 for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="model_store")
    p.add_argument("--category")
    p.add_argument("--engine", default="null", choices=["null", "onnx", "torch", "tensorrt", "auto"],
                   help="the server's MSFLOW_ENGINE (null: zero outputs, the front end alone)")
    p.add_argument("--device", default="cpu", help="the server's MSFLOW_DEVICE: on a GPU host, cuda with a real "
                   "engine measures the front end beside the GPU (with onnx on cpu, the CPU it spends outside "
                   "the engine is split from the engine's own)")
    p.add_argument("--kinds", nargs="*", default=TARGET_KINDS, choices=list(KINDS))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--client", default="httpx", choices=["httpx", "wrk"],
                   help="the load generator: the asyncio + httpx loop (reads every answer: per-answer timings, "
                   "batch sizes), or wrk (compiled, a thirtieth of the CPU per request: ceiling runs on a box "
                   "whose cores the client would share; loadtests/frontend_wrk.py)")
    p.add_argument("--rate", type=float, help="offer this many images a second (an open loop, evenly spaced, at "
                   "most --concurrency in flight) instead of saturating the server: modes compared at one load "
                   "below saturation, with cores to spare, as on a GPU host's many cores")
    p.add_argument("--rounds", type=int, default=1, help="drive every kind this many times, the kinds taking "
                   "turns; the report gives medians (and each round's share outside the engine)")
    p.add_argument("--decode-threads", type=int, default=DECODE_THREADS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--delay-ms", type=float, default=DELAY_MS)
    p.add_argument("--api-processes", type=int, default=1,
                   help="MSFLOW_API_PROCESSES of the server (>1: front ends + one engine process; CPU is summed "
                        "over all of them)")
    p.add_argument("--servers", type=int, default=1,
                   help="run this many separate single-process servers and spread the connections over them: "
                        "the work split over processes with no link between them, the floor under the same "
                        "--api-processes count on this box (CPU summed over all of them)")
    p.add_argument("--redis", action="store_true", help="serve with a redis-server of the benchmark's own "
                   "(MSFLOW_REDIS_URL: the result cache and heatmap links, as deployed)")
    p.add_argument("--distinct", action="store_true", help="every request's bytes differ (a comment naming it), "
                   "the pixels do not: with --redis, the result cache misses as on a line, where every photo "
                   "differs; without, the same answers as without it")
    p.add_argument("--review-items", type=int, default=0,
                   help="serve with a review store of this many items (MSFLOW_REVIEW_STORE, a temporary folder "
                        "filled by loadtests/review_fill.py): the default budget's 10,000 is a busy line's "
                        "steady state, and every audited answer is checked against it")
    p.add_argument("--review-labels", type=int, default=2_000, help="of those, labelled")
    p.add_argument("--loop-work-pixels", type=int, help="the server's MSFLOW_LOOP_WORK_PIXELS (0: every image's "
                   "work in the decode threads; default: the server's, small requests on the event loop)")
    p.add_argument("--intra-op-threads", type=int, help="the engine's CPU threads, in the server and in the bare "
                   "engine it is compared with (default: onnxruntime's, one per core)")
    p.add_argument("--image", help="post this image (resized to each kind's side, encoded in its format) instead "
                   "of the brick texture: with --engine onnx, a good or a defective part of the category measures "
                   "what the answers cost on each (a defect's regions cost more than none)")
    p.add_argument("--access-log", action="store_true", help="serve with the access log on, as by default (a "
                   "line per request; the benchmark's server is otherwise quiet), written to the server's log file")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-stage CPU profile")
    p.add_argument("--out")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
