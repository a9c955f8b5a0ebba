"""The front-end benchmark's compiled client: ``wrk`` (Debian's package) instead of the asyncio
+ httpx loop, for ceiling runs (``python -m loadtests.frontend --client wrk``).

On a small box the load generator competes with the server for the same cores: the httpx
loop spends about as much CPU per request as the server does (1.2 ms against 1.1 on the
thirteenth box), wrk a thirtieth of it (0.04 ms). With wrk the server gets the cores, and a
mode that needs more than one (two front ends and the engine process) shows what it does
with them. What wrk cannot give, the server's own metrics do: the mean batch (from
``msflow_batch_size``) and the mean decode and render times (``msflow_stage_seconds``); the
answers are not read, so there are no per-answer timings and no batch mix (the real engine's
split by batch size needs the httpx client). One wrk process per server (one thread on a small
box, a quarter of the cores at most on a large one), the connections spread; each request posts
the same bytes (``loadtests/wrk_post.lua``)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from loadtests.frontend_report import histogram_means, server_figures, window_metrics
from loadtests.procstat import trees_usage

SCRIPT = Path(__file__).with_name("wrk_post.lua")


def wrk_path() -> str:
    """The ``wrk`` binary, or a clear error naming how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("--client wrk needs the wrk load generator: scripts/install-wrk.sh (Debian's package)")
    return path


@dataclass(frozen=True)
class WrkRun:
    requests: int  # answered (any status), as wrk counts them
    failures: int  # non-2xx/3xx answers, connect/read/write errors and timeouts
    client_cpu_s: float  # every wrk process, user + system
    latency_ms: dict[str, float]  # the worst server's p50, p99, p99.9 and max
    duration_s: float  # the longest wrk run, as wrk timed it
    by_server: list[int]  # answered by each server


def run_wrk(urls: Sequence[str], path: str, body: bytes, content_type: str, connections: int,
            seconds: float) -> WrkRun:
    """``connections`` spread over the servers at ``urls``, each server loaded by one wrk
    process POSTing ``body`` to ``path`` for ``seconds`` (whole seconds: wrk's unit), all at once."""
    binary = wrk_path()
    per_server = max(1, -(-connections // len(urls)))
    threads = max(1, min(per_server, (os.cpu_count() or 1) // 4))  # one on a small box; more where one would cap
    with tempfile.TemporaryDirectory(prefix="msflow-wrk-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        before = _children_cpu_s()
        procs = []
        for i, url in enumerate(urls):
            env = {**os.environ, "BODY": str(body_file), "CTYPE": content_type, "SUMMARY": f"{tmp}/{i}.json"}
            procs.append(subprocess.Popen(
                [binary, f"-t{threads}", f"-c{per_server}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                 "-s", str(SCRIPT), url + path], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        outputs = [p.communicate()[0] for p in procs]
        for p, out in zip(procs, outputs):
            if p.returncode != 0:
                raise RuntimeError(f"wrk exited with {p.returncode}: {out[-2000:]}")
        spent = _children_cpu_s() - before
        summaries = [json.loads(Path(f"{tmp}/{i}.json").read_text()) for i in range(len(urls))]
    failures = sum(sum(s["errors"].values()) for s in summaries)
    return WrkRun(requests=sum(s["requests"] for s in summaries), failures=failures, client_cpu_s=spent,
                  latency_ms={k: round(max(s["latency_us"][k] for s in summaries) / 1e3, 2)
                              for k in ("p50", "p99", "p99.9", "max")},
                  duration_s=max(s["duration_us"] for s in summaries) / 1e6,
                  by_server=[s["requests"] - s["errors"]["status"] for s in summaries])


def _children_cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children: the wrk runs since
    return u.ru_utime + u.ru_stime


def drive_wrk(targets: Sequence[tuple[str, int]], category: str, data: bytes, content_type: str,
              query: dict[str, str], connections: int, seconds: float) -> dict[str, Any]:
    """:func:`loadtests.frontend.drive`'s figures with wrk as the client (saturation only):
    server CPU from ``/proc`` over the window as there; images and failures from wrk; the
    mean batch and the stage times from the servers' metrics, scraped at the window's edges."""
    urls, pids = [url for url, _ in targets], [pid for _, pid in targets]
    path = f"/v1/inspect/{category}?{urlencode(query)}"
    run_wrk(urls, path, data, content_type, connections, 1.0)  # warm-up
    before = [_metrics(url) for url in urls]
    usage0, t0 = trees_usage(pids), time.monotonic()
    r = run_wrk(urls, path, data, content_type, connections, seconds)
    wall, spent = time.monotonic() - t0, trees_usage(pids) - usage0
    after = [_metrics(url) for url in urls]
    n = r.requests - r.failures

    def mean_ms(family: str, label: str | None, key: str, scale: float = 1e3) -> float | None:
        s0, c0 = _added([histogram_means(t, family, label).get(key, (0.0, 0.0)) for t in before])
        s1, c1 = _added([histogram_means(t, family, label).get(key, (0.0, 0.0)) for t in after])
        return round((s1 - s0) / (c1 - c0) * scale, 2) if c1 > c0 else None

    passes, cache = window_metrics(before, after)
    return {"images": n, "failures": r.failures, "wall_s": round(wall, 2), "images_per_s": round(n / r.duration_s, 1),
            **server_figures(spent, n, r.duration_s),
            "client_cpu_ms_per_image": round(r.client_cpu_s / max(n, 1) * 1e3, 3),
            # each image's decode and render (wall time in the server) and the mean batch, from its metrics
            "decode_ms": mean_ms("msflow_stage_seconds", "stage", "decode"),
            "render_regions_ms": mean_ms("msflow_stage_seconds", "stage", "render"),
            "mean_batch": mean_ms("msflow_batch_size", None, "", scale=1.0),
            "batch_mix": {},  # wrk reads no answers: no batch size per image
            "client_latency_ms": r.latency_ms,
            "collector_passes": passes,
            **({"cache_lookups": cache} if any(cache.values()) else {}),
            **({"images_by_server": r.by_server} if len(urls) > 1 else {})}


def _metrics(url: str) -> str:
    with httpx.Client(base_url=url, timeout=30) as c:
        return c.get("/metrics").text


def _added(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
