"""Hostile load, bounded: does the server's memory stay within its pixel budget while
clients post the most expensive valid input there is?

    python -m loadtests.hostile --store model_store --duration 30
    python -m loadtests.hostile --store model_store --duration 30 --fail-on-violation

Starts its own ``msflow serve`` on a free loopback port (nothing else is reachable), then for
``--duration`` seconds runs five clients at once and stops by itself:

* four hostile clients, each alternating 32-file requests and 2-file requests of 6300 x 6300
  solid-grey PNGs (about 50 KB each on the wire, 40 megapixels each decoded) with
  ``heatmap_size=original&overlay=true``: the 32-file ones are over the per-request budget
  (413), the 2-file ones fit it and compete for the server-wide one (200, or 503 + Retry-After);
* a fifth client inspecting ordinary model-size images of another category (a copy of the
  first under another name when the store holds one category), which must keep getting 200s.

A sampler reads the server's resident memory (``/proc/<pid>/status``: VmRSS every 20 ms,
and VmHWM, the kernel's own peak) throughout. The report (``summary.md``, ``summary.json``)
gives the peak against the baseline (models loaded and warm) plus the configured budget
(``max_inflight_megapixels`` x ``--bytes-per-pixel``), the answers by client and status,
and every violation of the scenario's rules: no 5xx except 503 with Retry-After, the fifth
client never refused, the peak under the bound. Exit status 1 with ``--fail-on-violation``
when there is one, 2 when the server could not run.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from loadtests.run import LocalServer, wait_ready
from service.pipeline.decode_memory import PRICED_PIXEL_BYTES

GIANT_SIDE = 6300
BIG_REQUEST_FILES = 32
FITTING_REQUEST_FILES = 2  # 2 x 57 MP as priced (a grey PNG decodes at 5.5 bytes a pixel)


def giant_png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (GIANT_SIDE, GIANT_SIDE), level).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def ordinary_images(size: int, count: int = 8) -> list[bytes]:
    """Real textures (scikit-image's brick photograph), crops at the model's size."""
    from skimage import data as skdata

    texture = np.asarray(skdata.brick())
    out = []
    for k in range(count):
        y, x = (k * 37) % (texture.shape[0] - size), (k * 53) % (texture.shape[1] - size)
        buf = io.BytesIO()
        Image.fromarray(texture[y:y + size, x:x + size]).convert("RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


class Sampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_kb = 0
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            try:
                rss, _ = memory_kb(self.pid)
            except (OSError, KeyError):
                return
            self.peak_kb = max(self.peak_kb, rss)
            self.samples.append((round(time.monotonic() - t0, 3), rss))
            time.sleep(self.every_s)


class Tally:
    """Answers per client: status -> count, and the rule violations seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.violations: list[str] = []
        self.latency_ms: dict[str, list[float]] = collections.defaultdict(list)

    def record(self, client: str, kind: str, response: httpx.Response | None, error: str | None, ms: float) -> None:
        with self.lock:
            if response is None:
                self.status[client][f"{kind}:error"] += 1
                self.violations.append(f"{client} {kind}: no answer ({error})")
                return
            code = response.status_code
            self.status[client][f"{kind}:{code}"] += 1
            self.latency_ms[f"{client}:{kind}:{code}"].append(ms)
            if code >= 500 and not (code == 503 and response.headers.get("retry-after")):
                self.violations.append(f"{client} {kind}: {code} {response.text[:200]}")
            if code == 503 and client == "ordinary" :
                self.violations.append(f"ordinary client refused: {response.text[:200]}")
            if client == "ordinary" and code != 200:
                self.violations.append(f"ordinary client got {code}: {response.text[:200]}")
            if client.startswith("hostile") and code not in (200, 413, 503):
                self.violations.append(f"{client} {kind}: unexpected {code} {response.text[:200]}")


def hostile_client(name: str, url: str, category: str, giant: bytes, until: float, tally: Tally) -> None:
    params = {"heatmap_size": "original", "overlay": "true"}
    with httpx.Client(base_url=url, timeout=120) as c:
        turn = 0
        while time.monotonic() < until:
            n, kind = (BIG_REQUEST_FILES, "x32") if turn % 2 == 0 else (FITTING_REQUEST_FILES, f"x{FITTING_REQUEST_FILES}")
            turn += 1
            files = [("file", (f"{name}-{i}.png", giant, "image/png")) for i in range(n)]
            t0 = time.perf_counter()
            try:
                r = c.post(f"/v1/inspect/{category}", params=params, files=files)
                tally.record(name, kind, r, None, (time.perf_counter() - t0) * 1e3)
                if r.status_code == 503:
                    time.sleep(float(r.headers.get("retry-after", "1")) * 0.2)  # a polite but eager client
            except httpx.HTTPError as exc:
                tally.record(name, kind, None, repr(exc), (time.perf_counter() - t0) * 1e3)


def ordinary_client(url: str, category: str, images: list[bytes], until: float, tally: Tally) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        k = 0
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                r = c.post(f"/v1/inspect/{category}", files=[("file", (f"o{k}.png", images[k % len(images)],
                                                                        "image/png"))])
                tally.record("ordinary", "x1", r, None, (time.perf_counter() - t0) * 1e3)
            except httpx.HTTPError as exc:
                tally.record("ordinary", "x1", None, repr(exc), (time.perf_counter() - t0) * 1e3)
            k += 1


def two_categories(store: Path, scratch: Path) -> tuple[Path, str, str]:
    """(store, hostile category, ordinary category); with one category, a scratch store with
    a copy of it under a second name (its own lane and batcher, as a real second product)."""
    categories = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not categories:
        raise SystemExit(f"no category in {store}")
    if len(categories) >= 2:
        return store, categories[0], categories[1]
    from models.manifest import Manifest

    copy, second = scratch / "store", f"{categories[0]}-b"
    shutil.copytree(store / categories[0], copy / categories[0])
    shutil.copytree(store / categories[0], copy / second)
    for version in (copy / second).iterdir():  # the registry refuses a manifest naming another category
        if version.is_dir() and (version / "manifest.json").is_file():
            Manifest.read(version).model_copy(update={"category": second}).write(version)
    return copy, categories[0], second


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"reports/hostile-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="msflow-hostile-"))
    try:
        store, hostile_cat, ordinary_cat = two_categories(Path(args.store), scratch)
        env = {"MSFLOW_MAX_INFLIGHT_MEGAPIXELS": str(args.inflight_megapixels),
               "MSFLOW_MAX_REQUEST_MEGAPIXELS": str(args.request_megapixels),
               "MSFLOW_DEVICE": "cpu", "MSFLOW_STORE_POLL_S": "0", "MSFLOW_LOG_LEVEL": "warning",
               "MSFLOW_ACCESS_LOG": "false"}
        with LocalServer(str(store), out / "server.log", env=env) as server:
            try:
                wait_ready(server.url, server.proc, timeout=180)
            except RuntimeError as exc:
                print(f"hostile: {exc}; see {out / 'server.log'}", file=sys.stderr)
                return 2
            assert server.proc is not None
            with httpx.Client(base_url=server.url, timeout=30) as c:
                info = c.get(f"/v1/models/{ordinary_cat}")
                if info.status_code != 200:
                    print(f"hostile: GET /v1/models/{ordinary_cat}: {info.status_code} {info.text[:300]}", file=sys.stderr)
                    return 2
                size = int(info.json()["input_size"])
                ordinary = ordinary_images(size)
                for cat in (hostile_cat, ordinary_cat):  # warm both lanes: the baseline is the served models
                    for _ in range(3):
                        c.post(f"/v1/inspect/{cat}", files=[("file", ("w.png", ordinary[0], "image/png"))])
            time.sleep(0.5)
            baseline_kb, hwm_before_kb = memory_kb(server.proc.pid)
            giant = giant_png(128)
            tally = Tally()
            sampler = Sampler(server.proc.pid)
            sampler.start()
            until = time.monotonic() + args.duration
            threads = [threading.Thread(target=hostile_client, args=(f"hostile{i}", server.url, hostile_cat, giant,
                                                                     until, tally)) for i in range(4)]
            threads.append(threading.Thread(target=ordinary_client, args=(server.url, ordinary_cat, ordinary, until,
                                                                          tally)))
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.duration + 180)
            time.sleep(0.5)
            sampler.stop.set()
            sampler.join()
            alive = server.proc.poll() is None
            after_kb, hwm_kb = memory_kb(server.proc.pid) if alive else (0, 0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    budget_mb = args.inflight_megapixels * args.bytes_per_pixel
    bound_mb = baseline_kb / 1024 + budget_mb
    peak_mb = max(sampler.peak_kb, hwm_kb if hwm_kb > hwm_before_kb else 0) / 1024
    violations = list(tally.violations)
    if not alive:
        violations.append("the server died")
    if peak_mb > bound_mb:
        violations.append(f"peak RSS {peak_mb:.0f} MB over the bound {bound_mb:.0f} MB")
    if tally.status["ordinary"]["x1:200"] == 0:
        violations.append("the ordinary client got no answer")
    summary: dict[str, Any] = {
        "duration_s": args.duration, "hostile_category": hostile_cat, "ordinary_category": ordinary_cat,
        "giant_png_bytes": len(giant), "giant_megapixels": GIANT_SIDE * GIANT_SIDE / 1e6,
        "max_request_megapixels": args.request_megapixels, "max_inflight_megapixels": args.inflight_megapixels,
        "bytes_per_pixel": args.bytes_per_pixel, "baseline_rss_mb": round(baseline_kb / 1024, 1),
        "budget_mb": round(budget_mb, 1), "bound_mb": round(bound_mb, 1), "peak_rss_mb": round(peak_mb, 1),
        "peak_over_baseline_mb": round(peak_mb - baseline_kb / 1024, 1), "rss_after_mb": round(after_kb / 1024, 1),
        "vm_hwm_mb": round(hwm_kb / 1024, 1),
        "answers": {client: dict(sorted(counts.items())) for client, counts in sorted(tally.status.items())},
        "ordinary_p50_ms": round(percentile(tally.latency_ms["ordinary:x1:200"], 50), 1),
        "ordinary_p99_ms": round(percentile(tally.latency_ms["ordinary:x1:200"], 99), 1),
        "violations": violations[:50], "server_alive": alive,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "rss.csv").write_text("t_s,rss_kb\n" + "\n".join(f"{t},{kb}" for t, kb in sampler.samples) + "\n")
    (out / "summary.md").write_text(render(summary))
    print(render(summary))
    return 1 if violations and args.fail_on_violation else 0


def render(s: dict[str, Any]) -> str:
    lines = [
        "# Hostile load", "",
        f"- {s['duration_s']} s; 4 hostile clients on `{s['hostile_category']}` (32-file and "
        f"{FITTING_REQUEST_FILES}-file requests of {s['giant_megapixels']:.1f} MP grey PNGs, {s['giant_png_bytes'] // 1024} KB each, original-size overlays); "
        f"1 ordinary client on `{s['ordinary_category']}`",
        f"- budget: {s['max_request_megapixels']} MP per request, {s['max_inflight_megapixels']} MP in flight "
        f"x {s['bytes_per_pixel']} B = {s['budget_mb']} MB",
        f"- resident memory: baseline {s['baseline_rss_mb']} MB (models loaded, warm), peak {s['peak_rss_mb']} MB "
        f"(+{s['peak_over_baseline_mb']} MB), bound {s['bound_mb']} MB; after {s['rss_after_mb']} MB",
        f"- ordinary client: p50 {s['ordinary_p50_ms']} ms, p99 {s['ordinary_p99_ms']} ms", "",
        "| client | answers |", "| --- | --- |",
    ]
    lines += [f"| {client} | {', '.join(f'{k}: {v}' for k, v in counts.items())} |"
              for client, counts in s["answers"].items()]
    lines += ["", "Violations: " + ("none" if not s["violations"] else ""), *[f"- {v}" for v in s["violations"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="model_store")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (the run stops by itself)")
    p.add_argument("--request-megapixels", type=float, default=160.0)
    p.add_argument("--inflight-megapixels", type=float, default=320.0)
    p.add_argument("--bytes-per-pixel", type=float, default=PRICED_PIXEL_BYTES,
                   help="memory allowed per admitted pixel for the bound (MB per megapixel; default what one priced "
                        "pixel stands for, service/pipeline/decode_memory.py)")
    p.add_argument("--out", help="report folder (default reports/hostile-<UTC time>)")
    p.add_argument("--fail-on-violation", action="store_true")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
