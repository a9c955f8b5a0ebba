#!/usr/bin/env python3
"""Result-cache latency: cache hits against misses, measured against a running server.

    python scripts/cache_latency.py --url http://127.0.0.1:8000 --category grass \
        --image data/demo/grass/test/good/000.png -n 200 [--heatmap inline] [--api-key KEY]

Misses: ``n`` requests, each with the image re-encoded with a different PNG text chunk (the
same pixels and score, other bytes, so another cache key). Hits: one priming request, then
``n`` requests with the identical bytes. Requests are sequential (latency, not throughput),
interleaved miss/hit so both see the same machine load. Prints client-side latency
(p50/p90/p99/mean, ms), the server's own ``timings_ms.total``, and the ``msflow_cache_requests_total``
counters before/after (the hits must show up there). JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def variant(image: Image.Image, nonce: str) -> bytes:
    info = PngInfo()
    info.add_text("nonce", nonce)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def cache_counters(client: httpx.Client) -> dict[str, float]:
    out = {"hit": 0.0, "miss": 0.0, "error": 0.0}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("msflow_cache_requests_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


def summary(values: list[float]) -> dict[str, float]:
    s = sorted(values)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]

    return {"p50": round(pct(0.5), 2), "p90": round(pct(0.9), 2), "p99": round(pct(0.99), 2),
            "mean": round(statistics.fmean(s), 2), "n": len(s)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    image = Image.open(args.image)
    image.load()
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    path = f"/v1/inspect/{args.category}"
    params = {"heatmap": args.heatmap}
    stamp = f"{time.time_ns()}"
    hit_bytes = variant(image, f"hit-{stamp}")
    lat: dict[str, list[float]] = {"miss": [], "hit": []}
    server: dict[str, list[float]] = {"miss": [], "hit": []}
    with httpx.Client(base_url=args.url, headers=headers, timeout=60.0) as client:
        before = cache_counters(client)
        for i in range(args.warmup):  # warm connections, thread pools, the engine
            client.post(path, params=params, files=[("file", ("w.png", variant(image, f"w{i}-{stamp}"), "image/png"))])
        prime = client.post(path, params=params, files=[("file", ("h.png", hit_bytes, "image/png"))])
        prime.raise_for_status()
        for i in range(args.n):
            for kind, data in (("miss", variant(image, f"m{i}-{stamp}")), ("hit", hit_bytes)):
                t0 = time.perf_counter()
                r = client.post(path, params=params, files=[("file", (f"{kind}.png", data, "image/png"))])
                elapsed = (time.perf_counter() - t0) * 1e3
                r.raise_for_status()
                result = r.json()["results"][0]
                if result.get("cached") != (kind == "hit"):
                    raise SystemExit(f"request {i} ({kind}) came back cached={result.get('cached')}: is the cache "
                                     "on (MSFLOW_REDIS_URL, MSFLOW_CACHE_ENABLED)?")
                lat[kind].append(elapsed)
                server[kind].append(result["timings_ms"]["total"])
        after = cache_counters(client)
    report = {
        "url": args.url, "category": args.category, "image": str(args.image), "heatmap": args.heatmap,
        "image_bytes": len(hit_bytes), "requests_each": args.n,
        "client_ms": {k: summary(v) for k, v in lat.items()},
        "server_total_ms": {k: summary(v) for k, v in server.items()},
        "cache_counters_delta": {k: after[k] - before.get(k, 0.0) for k in after},
    }
    report["speedup_p50"] = round(report["client_ms"]["miss"]["p50"] / report["client_ms"]["hit"]["p50"], 2)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--category", default="grass")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("-n", type=int, default=100, help="requests of each kind")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--heatmap", default="inline", choices=["inline", "url", "none"])
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.n} misses / {args.n} hits, heatmap={args.heatmap}, {report['image_bytes']} B image, {args.url}")
        for kind in ("miss", "hit"):
            c, s = report["client_ms"][kind], report["server_total_ms"][kind]
            print(f"  {kind:>4}: client p50 {c['p50']:7.2f}  p90 {c['p90']:7.2f}  p99 {c['p99']:7.2f}  "
                  f"mean {c['mean']:7.2f} ms | server total p50 {s['p50']:7.2f} ms")
        print(f"  p50 speed-up {report['speedup_p50']}x; cache counters +{report['cache_counters_delta']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
