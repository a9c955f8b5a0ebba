"""`msflow bench`: images/s, latency and memory of every engine available on this host.

For each engine and batch size: ``warmup`` untimed runs (CUDA graphs are captured there),
then ``repeats`` timed ``engine.run`` calls on real demo images (the held-out normals of
the version's source run; random pixels only when those are gone). Each call is timed end
to end, numpy in to numpy out, so host<->device copies are included. Reported: images/s
from the median latency, latency p50/p95, and the memory each (engine, batch) measurement
took (:mod:`msflow.peak_memory` says how it is read, and what each figure sees).

Engines: ``onnxruntime-cpu`` and ``torch-cpu`` everywhere; on a CUDA host also
``onnxruntime-cuda``, ``tensorrt`` (when the version has a plan built for this host),
``torch-cuda-fp16`` and ``torch-cuda-fp16+cudagraphs`` (``torch-cuda`` fp32 on request).
CPU threads: each library's default (one per core) unless ``MSFLOW_BENCH_THREADS`` (or an
``args.threads``) sets the same count for both. On a shared host, oversubscribed cores hit
torch's OpenMP barriers much harder than onnxruntime's pool, so the 1-minute load average
before the run is recorded and a busy host is flagged.
The torch engines run the model's full forward, which also computes two maps the exported
graph prunes (``score_map``, ``pixel_map``); that is part of what the export buys.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.atomic_files import write_atomic
from models.manifest import Manifest
from msflow.engine_catalog import (cuda_available, default_engines, demo_images,
                                    make_engine, resolve_version, tile_batch, unavailable_reason)
from msflow.peak_memory import MEMORY_METHOD, MIB, PeakMemory, gpu_used_bytes, rss_bytes
from service.config import Settings
from service.engines.base import Engine

log = logging.getLogger(__name__)

DEFAULT_WARMUP = 2
RATIO_TARGET = {"batch": 8, "min_ratio": 1.3}


# ------------------------------------------------------------------ measurement

def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(engine: Engine, images: np.ndarray, batch: int, repeats: int, warmup: int,
            cuda: bool = False) -> dict[str, Any]:
    """Warm up, then time ``repeats`` calls of ``engine.run`` on a batch of ``batch``."""
    x = tile_batch(images, batch)
    with PeakMemory(cuda) as mem:
        for _ in range(max(warmup, 0)):
            engine.run(x)
        latencies = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            engine.run(x)
            latencies.append(time.perf_counter() - t0)
    ms = [t * 1000 for t in latencies]
    median_s = float(np.median(latencies))
    return {
        "batch": batch, "repeats": len(latencies), "images_per_s": batch / median_s,
        "latency_ms": {"p50": _percentile(ms, 50), "p95": _percentile(ms, 95), "min": min(ms), "max": max(ms),
                       "mean": float(np.mean(ms))},
        "rss_peak_mib": mem.rss_peak_mib, "gpu_peak_mib": mem.gpu_peak_mib, "memory_method": mem.method,
    }


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cpu_model = platform.processor() or platform.machine()
    physical: set[tuple[str, str]] = set()
    try:
        phys_id = "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name":
                cpu_model = value
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                physical.add((phys_id, value))
    except OSError:
        pass
    info: dict[str, Any] = {
        "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model, "logical_cores": os.cpu_count(), "physical_cores": len(physical) or None,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(), "cuda": torch.cuda.is_available(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        info["cgroup_cpu_max"] = Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        pass
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu_name=torch.cuda.get_device_name(), gpu_capability=f"{major}.{minor}",
                    gpu_memory_mib=torch.cuda.get_device_properties(0).total_memory / MIB,
                    cuda_runtime=torch.version.cuda)
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def bench_engines(version_dir: Path, engines: list[str], batch_sizes: list[int], repeats: int,
                  warmup: int = DEFAULT_WARMUP, explicit: bool = False, threads: int | None = None,
                  progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every engine in ``engines``; engines that cannot run here are reported, not fatal.
    ``threads``: CPU threads for both onnxruntime and torch (default: each library's own)."""
    if repeats < 1:  # measure() would time one run and the report say `repeats`
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    import torch

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_engines(version_dir, engines, batch_sizes, repeats, warmup, explicit, threads, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _bench_engines(version_dir: Path, engines: list[str], batch_sizes: list[int], repeats: int, warmup: int,
                   explicit: bool, threads: int | None, progress: Callable[[str], None]) -> dict[str, Any]:
    manifest = Manifest.read(version_dir)
    images, source = demo_images(manifest, limit=max(batch_sizes))
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    cuda = cuda_available()
    if cuda:
        import torch

        torch.cuda.init()
        torch.empty(1, device="cuda")  # create the CUDA context before measuring any engine
    status: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    for name in engines:
        reason = unavailable_reason(name, manifest)
        if reason:
            status[name] = {"status": "failed" if explicit else "skipped", "reason": reason}
            progress(f"{name}: skipped ({reason})")
            continue
        gpu_before = gpu_used_bytes() if cuda else None
        rss_before = rss_bytes()
        t0 = time.perf_counter()
        try:
            engine = make_engine(name, version_dir, manifest, max(batch_sizes), threads)
        except Exception as e:  # EngineError, ManifestError, a provider that fails to initialise
            status[name] = {"status": "failed" if explicit else "skipped", "reason": f"{type(e).__name__}: {e}"}
            progress(f"{name}: cannot load ({e})")
            continue
        entry: dict[str, Any] = {"status": "ok", "engine_name": engine.name, "load_s": time.perf_counter() - t0,
                                 "load_rss_mib": max(rss_bytes() - rss_before, 0) / MIB}
        on_gpu = cuda and (name.startswith(("torch-cuda", "onnxruntime-cuda")) or name == "tensorrt")
        try:
            for batch in batch_sizes:
                row = measure(engine, images, batch, repeats, warmup, cuda=on_gpu)
                if on_gpu and gpu_before is not None:
                    used = gpu_used_bytes()
                    row["gpu_used_mib"] = max((used or 0) - gpu_before, 0) / MIB
                row["engine"] = name
                results.append(row)
                progress(f"{name} batch {batch}: {row['images_per_s']:.1f} images/s")
        except Exception as e:
            entry = {**entry, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
            progress(f"{name}: failed ({e})")
        status[name] = entry
        del engine
        gc.collect()
        if cuda:
            import torch

            torch.cuda.empty_cache()
    ratio = onnx_over_torch(results)
    return {
        "model": {"version_dir": str(version_dir), "category": manifest.category, "version": manifest.version,
                  "input_size": manifest.input_size, "backbone": manifest.backbone,
                  "score_output": manifest.calibration.score_output,
                  "tensorrt_plan": manifest.tensorrt.model_dump() if manifest.tensorrt else None},
        "machine": machine_info(),
        "settings": {"engines": engines, "batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup,
                     "threads": threads or "library default",
                     "input": source, "timing": "engine.run wall time, numpy uint8 in -> numpy float32 out; "
                     "images/s = batch / median latency"},
        "memory_method": MEMORY_METHOD,
        "load_average_before": load_before,
        "engines": status,
        "results": results,
        "ratio_onnxruntime_cpu_over_torch_cpu": ratio,
        "ratio_target": {**RATIO_TARGET,
                         "met": (ratio.get(str(RATIO_TARGET["batch"])) or 0) >= RATIO_TARGET["min_ratio"]
                         if str(RATIO_TARGET["batch"]) in ratio else None},
    }


def onnx_over_torch(results: list[dict[str, Any]]) -> dict[str, float]:
    by = {(r["engine"], r["batch"]): r["images_per_s"] for r in results}
    return {str(b): by[("onnxruntime-cpu", b)] / by[("torch-cpu", b)]
            for (e, b) in by if e == "onnxruntime-cpu" and ("torch-cpu", b) in by}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    header = ("engine", "batch", "images/s", "p50 ms", "p95 ms", "RSS peak MiB", "GPU peak MiB", "GPU used MiB")
    rows = [header]
    for r in report["results"]:
        rows.append((r["engine"], str(r["batch"]), _fmt(r["images_per_s"], ".1f"), _fmt(r["latency_ms"]["p50"], ".1f"),
                     _fmt(r["latency_ms"]["p95"], ".1f"), _fmt(r["rss_peak_mib"], ".0f"),
                     _fmt(r.get("gpu_peak_mib"), ".0f"), _fmt(r.get("gpu_used_mib"), ".0f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, st in report["engines"].items():
        if st["status"] != "ok":
            lines.append(f"{name}: {st['status']} - {st.get('reason')}")
    ratio = report["ratio_onnxruntime_cpu_over_torch_cpu"]
    if ratio:
        parts = ", ".join(f"batch {b}: {v:.2f}x" for b, v in ratio.items())
        target = report["ratio_target"]
        verdict = "" if target["met"] is None else (" (met)" if target["met"] else " (NOT met)")
        lines.append(f"ratio onnxruntime-cpu / torch-cpu images/s: {parts}; target >= {target['min_ratio']}x "
                     f"at batch {target['batch']}{verdict}")
    return "\n".join(lines)


BENCH_DEVICES = ("auto", "cpu", "cuda")


def default_out(manifest: Manifest) -> Path:
    """Where a report goes without ``--out``: the current folder, never the model store (a
    version folder is what an export published: it may be a read-only mount, and the
    server watches it)."""
    return Path(f"bench-{manifest.category}-{manifest.version}-{socket.gethostname()}.json")


def check_writable(out: Path) -> None:
    """OSError, before the minutes of benchmarking, when the report could not be written."""
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: name a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # FileExistsError/NotADirectoryError under a file
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass  # PermissionError, or EROFS on a read-only mount
    except OSError as exc:
        raise OSError(f"cannot write the report to {out}: {exc}") from exc


def run_bench(args: argparse.Namespace) -> int:
    device = getattr(args, "device", "auto") or "auto"
    if device not in BENCH_DEVICES:
        raise ValueError(f"unknown device {device!r} (one of {', '.join(BENCH_DEVICES)})")
    if device == "cuda" and not cuda_available():
        raise ValueError("device 'cuda': no CUDA GPU on this host")
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")
    batch_sizes = sorted(set(args.batch_sizes or [1, 8, 32]))
    if min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    version_dir = resolve_version(args.model)  # EngineError: neither a version nor a category
    explicit = bool(args.engines)
    engines = list(args.engines) if explicit else default_engines(device)
    manifest = Manifest.read(version_dir)
    out = Path(args.out) if args.out else default_out(manifest)
    check_writable(out)
    print(f"benchmarking {manifest.category} version {manifest.version} (input {manifest.input_size}) "
          f"from {version_dir}: engines {', '.join(engines)}; batches {batch_sizes}; {args.repeats} repeats")
    threads = getattr(args, "threads", None) or Settings().bench_threads or None
    report = bench_engines(version_dir, engines, batch_sizes, args.repeats,
                           warmup=getattr(args, "warmup", DEFAULT_WARMUP), explicit=explicit, threads=threads)
    m = report["machine"]
    print(f"\n{m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"onnxruntime {m['onnxruntime']}" + (f", {m['gpu_name']}" if m.get("gpu_name") else "")
          + f"; input: {report['settings']['input']}")
    print(format_table(report))
    busy = report["load_average_before"]
    if busy and busy[0] > 0.5 * (m["usable_cores"] or 1):
        print(f"WARNING: the host was busy before the benchmark (1-min load average {busy[0]:.1f} on "
              f"{m['usable_cores']} cores): CPU numbers are contaminated by other processes")
    write_atomic(out, json.dumps(report, indent=2, default=str))
    print(f"report: {out}")
    ran = [n for n, s in report["engines"].items() if s["status"] == "ok"]
    failed = [n for n, s in report["engines"].items() if s["status"] == "failed"]
    return 0 if ran and not failed else 1
