"""Load-test tooling: a short headless Locust run through ``python -m loadtests.run --serve``
against a real ``msflow serve`` (the exported test model, the demo test images), plus
offline checks of the locustfile's helpers and of the runner's report.

The smoke run posts real images for ~10 s with 4 users and fails on any failed request; it
is a check that the load test and the service agree, not a benchmark.
"""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import missing

ROOT = Path(__file__).resolve().parents[2]
CATEGORY = "brick"


def _load_runner():
    """loadtests/run.py as a module (it imports nothing from Locust)."""
    spec = importlib.util.spec_from_file_location("loadtests_run", ROOT / "loadtests" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSFLOW_", "LOCUST_"))}
    env.update(extra)
    return env


def _summary(cmd: list[str], out: Path) -> dict:
    """Run a benchmark (``cmd``, writing to ``out``) to completion; its summary.json."""
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


def _locust_available() -> bool:
    return importlib.util.find_spec("locust") is not None


needs_locust = pytest.mark.skipif(not _locust_available(), reason="locust is not installed (pip install locust)")


# ---------------------------------------------------------------------- runner report, offline
STATS_HEADER = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
                "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
                "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]


def _stats_row(kind: str, name: str, count: int, failures: int, rps: float, p50: int, p95: int, p99: int) -> list:
    return [kind, name, count, failures, p50, p50 + 1, 1, p99 + 5, 100, rps, 0.0,
            p50, p50, p50, p50, p95, p95, p99, p99, p99, p99, p99 + 5]


def test_runner_summarizes_locust_csv(tmp_path):
    run = _load_runner()
    with open(tmp_path / "locust_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STATS_HEADER)
        w.writerow(_stats_row("POST", "/v1/inspect/[category]?heatmap=none", 100, 0, 10.0, 20, 40, 60))
        w.writerow(_stats_row("POST", "/v1/inspect/[category]?heatmap=none [x4]", 20, 1, 2.0, 50, 90, 120))
        w.writerow(_stats_row("GET", "/v1/jobs/[id]", 30, 0, 3.0, 5, 9, 12))
        w.writerow(_stats_row("", "Aggregated", 150, 1, 15.0, 21, 80, 110))
    with open(tmp_path / "locust_failures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Method", "Name", "Error", "Occurrences"])
        w.writerow(["POST", "/v1/inspect/[category]?heatmap=none [x4]", "HTTP 503: queue full", 1])
    s = run.summarize(tmp_path / "locust")
    assert s["requests"] == 150 and s["failures"] == 1
    assert s["images_per_s"] == pytest.approx(10.0 + 2.0 * 4)  # [x4]: four images per request
    assert s["images"] == 100 + 19 * 4
    assert s["latency_ms"]["p50_ms"] == 21 and s["latency_ms"]["p95_ms"] == 80 and s["latency_ms"]["p99_ms"] == 110
    md = run.render_markdown(s, {"url": "http://127.0.0.1:1", "users": 4, "spawn_rate": 4, "duration": "10s",
                                 "started": "now", "served": False})
    assert "| images/s (synchronous inspect) | 18.0 |" in md
    assert "21 / 80 / 110" in md
    assert "HTTP 503: queue full" in md
    assert run._seconds("1m30s") == 90 and run._seconds("45") == 45


def test_runner_fails_cleanly_when_nothing_listens(tmp_path):
    port = _load_runner().free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.run", "--url", f"http://127.0.0.1:{port}", "--duration", "1s",
         "--ready-timeout", "1", "--out", str(tmp_path / "out")],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not ready" in proc.stderr


# ---------------------------------------------------------------------- locustfile helpers, offline
@needs_locust
def test_locustfile_helpers(demo_root, tmp_path):
    """Run in a subprocess: importing Locust monkey-patches the standard library (gevent)."""
    flat_dir = tmp_path / "flat" / "sub"
    flat_dir.mkdir(parents=True)
    for i, png in enumerate(sorted((demo_root / CATEGORY / "test").glob("*/*.png"))[:3]):
        (flat_dir / f"{i}.png").write_bytes(png.read_bytes())
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / 'loadtests')!r})
        import locustfile as lf

        found = lf.discover_images({str(demo_root)!r})
        assert set(found) == {{"brick"}}, found
        assert all("/test/" in str(p) for p in found["brick"])
        one = lf.discover_images({str(demo_root / CATEGORY / 'test')!r})
        assert set(one) == {{"brick"}} and len(one["brick"]) == len(found["brick"])
        flat = lf.discover_images({str(tmp_path / 'flat')!r})
        assert set(flat) == {{lf.ANY}} and len(flat[lf.ANY]) == 3
        assert lf.discover_images({str(demo_root / CATEGORY / 'test' / '*' / '*.png')!r}).keys() == {{"brick"}}

        assert lf.parse_weights("grass:3, brick ,x:0") == {{"grass": 3.0, "brick": 1.0}}
        assert lf.categories_from_models({{"models": [{{"category": "grass"}}, {{"category": "brick"}}], "failed": {{}}}}) == ["grass", "brick"]
        assert lf.categories_from_models(["a", "b"]) == ["a", "b"]
        assert lf.categories_from_models(None) == []
        assert lf.redis_healthy({{"status": "ready", "models": {{"brick": "1"}}}}) is False
        assert lf.redis_healthy({{"status": "ready", "redis": "ok"}}) is True
        assert lf.redis_healthy({{"checks": {{"redis": {{"status": "ok"}}}}}}) is True
        assert lf.redis_healthy({{"redis": "degraded"}}) is False

        png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
        def body(heatmap):
            return {{"request_id": "r", "category": "brick", "model_version": "1", "engine": "e", "results": [
                {{"index": 0, "score": 0.3, "raw_score": 1.0, "threshold": 2.0, "is_anomalous": False,
                  "heatmap": heatmap, "timings_ms": {{}}}}]}}
        assert lf.check_inspect(body(None), "brick", 1, "none") is None
        assert lf.check_inspect(body({{"format": "png", "encoding": "base64", "data": png}}), "brick", 1, "inline") is None
        assert "no inline heatmap" in lf.check_inspect(body(None), "brick", 1, "inline")
        assert "not a base64 PNG" in lf.check_inspect(body({{"data": "aGVsbG8gd29ybGQ="}}), "brick", 1, "inline")
        assert "expected 2 results" in lf.check_inspect(body(None), "brick", 2, "none")
        assert "category" in lf.check_inspect(body(None), "grass", 1, "none")
        bad = body(None); bad["results"][0]["score"] = 1.5
        assert "outside [0, 1]" in lf.check_inspect(bad, "brick", 1, "none")
        assert lf.heatmap_link({{"url": "/v1/heatmaps/x.png"}}) == "/v1/heatmaps/x.png"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# ---------------------------------------------------------------------- the smoke run
@needs_locust
@pytest.mark.slow
def test_headless_locust_smoke_against_msflow_serve(model_store, demo_root, tmp_path):
    out = tmp_path / "report"
    env = _clean_env(MSFLOW_DEVICE="cpu", MSFLOW_ACCESS_LOG="false", MSFLOW_LOG_LEVEL="warning",
                     MSFLOW_INTRA_OP_THREADS="1", MSFLOW_DECODE_THREADS="2")
    cmd = [sys.executable, "-m", "loadtests.run", "--serve", "--store", str(model_store),
           "--users", "4", "--spawn-rate", "4", "--duration", "10s", "--stop-timeout", "5",
           "--images", str(demo_root / CATEGORY / "test"), "--categories", CATEGORY,
           "--fail-on-error", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    logs = proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("server.log", "locust.log"):
        if (out / name).exists():
            logs += f"\n--- {name} ---\n" + (out / name).read_text(errors="replace")[-2000:]
    assert proc.returncode == 0, logs

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == 0, logs
    assert summary["requests"] >= 10, logs
    names = {e["name"] for e in summary["endpoints"]}
    assert {"/v1/inspect/[category]?heatmap=none", "/v1/inspect/[category]?heatmap=inline"} <= names, names
    assert not any("jobs" in n or "heatmaps" in n for n in names), "Redis tasks must be off without Redis"
    assert summary["images_per_s"] > 0 and summary["latency_ms"]["p95_ms"] is not None
    md = (out / "summary.md").read_text()
    assert "images/s" in md and "p50 / p95 / p99" in md
    for artefact in ("report.html", "locust_stats.csv", "server.log"):
        assert (out / artefact).is_file(), artefact

    # "Starts nothing it does not stop": the server the runner started is gone.
    pid = summary["meta"]["server_pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_hostile_load_scenario_stays_within_its_budget(model_store, tmp_path):
    """The hostile scenario (loadtests/hostile.py), shortened: 40-megapixel PNG bombs with
    original-size overlays from four clients, an ordinary client on a second lane. It must
    refuse with 413 / 503 + Retry-After (never another 5xx), keep serving the ordinary
    client, and hold the server's peak resident memory under baseline + budget."""
    out = tmp_path / "hostile"
    env = _clean_env(MSFLOW_INTRA_OP_THREADS="1", MSFLOW_DECODE_THREADS="2")
    cmd = [sys.executable, "-m", "loadtests.hostile", "--store", str(model_store), "--duration", "8",
           "--inflight-megapixels", "200", "--request-megapixels", "150", "--fail-on-violation", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    logs = proc.stdout[-3000:] + proc.stderr[-3000:]
    if (out / "server.log").exists():
        logs += "\n--- server.log ---\n" + (out / "server.log").read_text(errors="replace")[-2000:]
    assert proc.returncode == 0, logs
    s = json.loads((out / "summary.json").read_text())
    assert s["violations"] == [] and s["server_alive"], logs
    hostile = collections.Counter()
    for client, counts in s["answers"].items():
        if client.startswith("hostile"):
            hostile.update(counts)
    assert hostile["x32:413"] >= 4, s["answers"]  # each client's first request, at least
    assert hostile["x3:200"] >= 1, s["answers"]  # what fits the budget is served
    assert s["answers"]["ordinary"]["x1:200"] >= 3 and set(s["answers"]["ordinary"]) == {"x1:200"}
    assert s["peak_rss_mb"] <= s["bound_mb"] == pytest.approx(s["baseline_rss_mb"] + 200 * 4.0, abs=0.2)


def test_redis_fault_scenario_every_job_once_and_overrides_survive_flushall(model_store, tmp_path):
    """loadtests/redis_faults.py, shortened: submissions through repeated Redis stalls (the
    client resubmitting with its Idempotency-Key when the API answers 503), a worker
    SIGKILLed mid-job, then FLUSHALL. Every job done, each queued once; the threshold
    override never reverts and is back in Redis within 5 s."""
    import shutil as _shutil

    from harness import missing

    if _shutil.which("redis-server") is None:
        missing("redis-server is not installed: run scripts/install-redis.sh")
    out = tmp_path / "faults"
    env = _clean_env(MSFLOW_INTRA_OP_THREADS="1", MSFLOW_DECODE_THREADS="2")
    cmd = [sys.executable, "-m", "loadtests.redis_faults", "--store", str(model_store), "--jobs", "9",
           "--stall-s", "2", "--fail-on-violation", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    logs = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, logs
    s = json.loads((out / "summary.json").read_text())
    assert s["violations"] == [] and s["statuses"] == {"done": 9}, logs
    assert s["stream_entries_added"] == s["distinct_jobs"] == 9 and s["dead_lettered"] == 0
    assert s["stalls"] >= 2 and s["killed_worker"] in {"w1", "w2"}
    assert s["flushall"]["reverted_reads"] == 0 and s["flushall"]["restored_in_redis_after_s"] <= 5.0


def test_frontend_benchmark_on_the_null_engine(model_store, tmp_path):
    """loadtests/frontend.py, briefly: the null engine answers every kind of input, and the
    report has CPU per image, throughput, the client's own CPU and latency, and the stage
    profile. Driven over two separate servers (``--servers 2``, the floor of a split): the
    connections reach both, and the CPU of both is counted; both serve one review store
    already holding 300 items (``--review-items``) and share one Redis, and every request's
    bytes differ (``--redis --distinct``): the result cache misses every time."""
    out = tmp_path / "frontend"
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--seconds", "1.5",
           "--concurrency", "4", "--servers", "2", "--review-items", "300", "--review-labels", "50",
           "--redis", "--distinct", "--kinds", "jpeg256-none", "png256-inline", "jpeg2048-none", "png256-overlay",
           "--out", str(out)]
    s = _summary(cmd, out)
    assert s["engine"] == "null" and set(s["kinds"]) == {"jpeg256-none", "png256-inline", "jpeg2048-none",
                                                         "png256-overlay"}
    assert s["review_store"] == {"items": 300, "labelled": 50}  # served with a review store of that size
    assert s["redis"] and s["distinct"]
    for kind, r in s["kinds"].items():
        assert r["failures"] == 0 and r["images"] > 0, (kind, r)
        assert r["server_cpu_ms_per_image"] > 0 and r["client_cpu_ms_per_image"] > 0
        assert len(r["images_by_server"]) == 2 and min(r["images_by_server"]) > 0, r["images_by_server"]
        assert sum(r["images_by_server"]) == r["images"]
        assert r["switches_per_image"]["server"]["voluntary"] > 0  # the servers' threads waited for work
        # one Redis for both servers, and every request's bytes distinct: every lookup a miss
        assert r["cache_lookups"].get("miss", 0) >= r["images"] and r["cache_lookups"].get("hit", 0) == 0, r
        waits = r["client_latency_ms"]  # the tail shows the server's stalls (a collector's full pass, once)
        assert 0 < waits["p50"] <= waits["p99"] <= waits["p99.9"] <= waits["max"], (kind, waits)
        assert {"multipart", "decode", "resize", "regions", "json", "other"} <= set(r["profile_ms"])
    assert "heatmap_encode" in s["kinds"]["png256-inline"]["profile_ms"]
    # the answers' size, read from each answer: an inline heatmap's base64 makes it larger
    answers = {kind: r["answer_bytes"] for kind, r in s["kinds"].items()}
    assert answers["png256-inline"] > answers["jpeg256-none"] > 0, answers
    assert answers["png256-overlay"] > 5 * answers["png256-inline"], answers  # the photograph under the heatmap
    assert "KB, answers " in (out / "summary.md").read_text()
    # the collector's passes in the windows, from the server's own metric: counted, timed, bounded
    passes = {k: v for r in s["kinds"].values() for k, v in r["collector_passes"].items()}
    assert any(k.startswith("api gen") and k.endswith(" passes") and v > 0 for k, v in passes.items()), passes
    for key in (k for k in passes if k.endswith(" passes")):
        name = key[:-len(" passes")]
        assert passes[f"{name} ms"] >= 0 and passes[f"{name} longest under ms"] > 0, passes
    # (That a 2048 px JPEG decodes at 1/8 scale is checked on its pixels, not its time:
    # tests/unit/test_imaging.py::test_large_jpeg_decodes_at_reduced_scale_like_the_trainer.)


def test_frontend_benchmark_offers_a_fixed_rate(model_store, tmp_path):
    """``--rate``: an open loop at a fixed rate below saturation (modes compared at one load,
    with cores to spare): the server answers at the offered rate, not faster, and the report
    says what was offered."""
    out = tmp_path / "frontend-rate"
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--seconds", "2",
           "--rate", "40", "--kinds", "jpeg256-none", "--no-profile", "--out", str(out)]
    s = _summary(cmd, out)
    r = s["kinds"]["jpeg256-none"]
    assert s["rate"] == 40 and r["offered_per_s"] == 40 and r["failures"] == 0
    # 80 due in the window; the last answers land just after it (the window waits for them)
    assert 76 <= r["images"] <= 81 and 30 <= r["images_per_s"] <= 41, r
    assert r["mean_batch"] < 2  # one image every 25 ms: no queue for batches to form from
    assert "40 images/s offered" in (out / "summary.md").read_text()


def test_frontend_benchmark_with_the_compiled_client(model_store, tmp_path):
    """``--client wrk``: Debian's wrk loads two servers (the connections spread over both); the
    report has images, the client's CPU (a fraction of the server's: the point of a compiled
    client), the latency wrk measured, and from the servers' metrics the mean batch and the
    decode time. Options that need the answers read are refused before any server starts."""
    if shutil.which("wrk") is None:
        missing("no wrk: run scripts/install-wrk.sh")
    out = tmp_path / "frontend-wrk"
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--seconds", "2",
           "--client", "wrk", "--servers", "2", "--kinds", "jpeg256-none", "png256-overlay", "--no-profile",
           "--out", str(out)]
    s = _summary(cmd, out)
    overlay = s["kinds"]["png256-overlay"]  # its query (heatmap=inline&overlay=true) reached the servers
    assert overlay["failures"] == 0 and overlay["render_regions_ms"] > 0, overlay
    r = s["kinds"]["jpeg256-none"]
    assert s["client"] == "wrk" and r["failures"] == 0 and r["images"] > 0, r
    assert min(r["images_by_server"]) > 0 and sum(r["images_by_server"]) == r["images"], r["images_by_server"]
    assert 0 < r["client_cpu_ms_per_image"] < r["server_cpu_ms_per_image"] / 3, r
    assert 1 <= r["mean_batch"] <= 8 and r["decode_ms"] > 0 and r["render_regions_ms"] is None, r
    assert 0 < r["client_latency_ms"]["p50"] <= r["client_latency_ms"]["max"], r["client_latency_ms"]
    assert "8 in flight from wrk" in (out / "summary.md").read_text()
    refused = subprocess.run(cmd[:-2] + ["--rate", "50", "--out", str(tmp_path / "refused")], cwd=ROOT,
                             env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "need the httpx client" in refused.stderr
    assert not (tmp_path / "refused" / "summary.json").exists()


def test_frontend_benchmark_splits_the_real_engines_cpu_from_the_rest(model_store, demo_root, tmp_path):
    """With the real engine the report splits the server's CPU by thread (the threads named
    engine-*: the batcher's engine thread and onnxruntime's pool) and compares it with the bare
    engine at the batch sizes the server formed; ``--image`` posts a part of the category,
    ``--rounds`` reports the medians of several windows, and the stage profile runs on the
    real model's map."""
    out = tmp_path / "frontend-onnx"
    good = sorted((demo_root / CATEGORY / "test" / "good").iterdir())[0]
    cmd = [sys.executable, "-m", "loadtests.frontend", "--store", str(model_store), "--engine", "onnx",
           "--seconds", "1", "--rounds", "2", "--concurrency", "4", "--kinds", "jpeg256-none",
           "--image", str(good), "--out", str(out)]
    summary = _summary(cmd, out)
    assert summary["image"] == str(good) and str(good) in (out / "summary.md").read_text()
    # the engine the server loaded, as it names it (on a GPU host --device cuda serves on the GPU)
    assert summary["device"] == "cpu" and summary["served_engine"].startswith("onnxruntime"), summary["served_engine"]
    assert f"onnx: {summary['served_engine']} engine" in (out / "summary.md").read_text()
    r = summary["kinds"]["jpeg256-none"]
    assert r["failures"] == 0 and sum(r["batch_mix"].values()) == r["images"] > 0
    assert set(r["bare_engine_by_batch_ms"]) == set(r["batch_mix"])
    # the engine is most of the server's CPU, and the rest is not nothing (HTTP, decode)
    assert 0.5 * r["server_cpu_ms_per_image"] < r["engine_threads_cpu_ms_per_image"] < r["server_cpu_ms_per_image"]
    assert r["outside_threads_ms"] > 0 and r["bare_engine_cpu_ms_per_image"] > 0
    # the stage profile labels and colours the real model's map of this image (run here)
    assert {"decode", "regions", "json", "other"} <= set(r["profile_ms"]) and r["profile_ms"]["regions"] > 0
    # two rounds: their images and batches add up, the figures are their medians, and each
    # round has its own bare-engine comparison (measured right after it)
    assert len(r["rounds"]) == 2 and sum(x["images"] for x in r["rounds"]) == r["images"]
    assert all(set(x["bare_engine_by_batch_ms"]) == set(x["batch_mix"]) for x in r["rounds"])
    shares = sorted(x["outside_threads_share"] for x in r["rounds"])
    assert r["outside_threads_share"] == pytest.approx(sum(shares) / 2, abs=1e-3)


def test_engine_link_benchmark_compares_the_link_with_a_local_batcher(model_store, tmp_path):
    """loadtests/engine_link.py, briefly: the same images through a local batcher and through
    a real engine process, CPU per image on each side of the link, batches as configured."""
    out = tmp_path / "engine-link"
    cmd = [sys.executable, "-m", "loadtests.engine_link", "--store", str(model_store), "--seconds", "0.5",
           "--rounds", "1", "--in-flight", "1", "8", "--out", str(out)]
    s = _summary(cmd, out)
    assert [(w["mode"], w["in_flight"]) for w in s["medians"]] == [("local", 1), ("link", 1), ("local", 8), ("link", 8)]
    for w in s["medians"]:
        assert w["images_per_s"] > 0 and w["client_cpu_ms"] > 0, w
        assert (w["engine_cpu_ms"] > 0) == (w["mode"] == "link"), w  # only the link has an engine process
        assert 1 <= w["mean_batch"] <= w["in_flight"], w
    assert "the link costs" in (out / "summary.md").read_text()
    assert all(0 < us < 10_000 for us in s["bare_round_trip_cpu_us"]), s["bare_round_trip_cpu_us"]


def test_serving_modes_take_turns_and_are_compared_round_by_round(model_store, tmp_path):
    """loadtests/frontend_modes.py, briefly: two modes in each of two rounds, each mode's CPU
    per image as a ratio to the first mode's of the same round (1 for the first itself), and
    a bad mode or a mode's own option after ``--`` refused before any server starts."""
    out = tmp_path / "modes"
    cmd = [sys.executable, "-m", "loadtests.frontend_modes", "--store", str(model_store), "--modes", "one",
           "api=2", "--rounds", "2", "--out", str(out), "--", "--seconds", "1", "--kinds", "jpeg256-none",
           "--no-profile"]
    s = _summary(cmd, out)
    assert [(row["round"], row["mode"]) for row in s["rows"]] == [(1, "one"), (1, "api=2"), (2, "one"), (2, "api=2")]
    for row in s["rows"]:
        assert row["ok"] and row["cpu_ms"] > 0 and row["images_per_s"] > 0, row
        mine = next(x for x in s["rows"] if x["round"] == row["round"] and x["mode"] == "one")
        assert row["cpu_ratio"] == pytest.approx(row["cpu_ms"] / mine["cpu_ms"], abs=1e-3), row
    assert set(s["rows"][1]["by_process"]) >= {"engine process", "front ends"}, s["rows"][1]
    assert "| jpeg256-none | api=2 |" in (out / "summary.md").read_text()
    # each process role's time in the kernel (part of its CPU) and its page faults, per image
    split = json.loads((out / "round1-api2" / "summary.json").read_text())["kinds"]["jpeg256-none"]
    for role, cpu in split["processes_cpu_ms_per_image"].items():
        assert 0 <= split["kernel_cpu_ms_per_image"][role] <= cpu + 0.01, (role, split)
        assert split["minor_faults_per_image"][role] >= 0, (role, split)
    assert "faults" in (out / "round1-api2" / "summary.md").read_text()
    for bad in (["--modes", "two"], ["--modes", "api=0"], ["--modes", "one", "--", "--servers", "2"]):
        refused = subprocess.run([sys.executable, "-m", "loadtests.frontend_modes", "--store", str(model_store),
                                  "--out", str(tmp_path / "refused"), *bad], cwd=ROOT, env=_clean_env(),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "mode" in refused.stderr, (bad, refused.stderr[-500:])
        assert not (tmp_path / "refused" / "summary.json").exists()


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (Debian's package valgrind): "
                    "loadtests/instructions.py counts with it")
def test_instruction_counts_compare_modes_by_process(model_store, tmp_path):
    """loadtests/instructions.py, briefly: both modes counted under callgrind, by process
    role, the copies apart from the rest; a bad mode refused before any server starts."""
    out = tmp_path / "instructions"
    cmd = [sys.executable, "-m", "loadtests.instructions", "--store", str(model_store), "--modes", "one", "api=2",
           "--requests", "24", "--warmup", "4", "--concurrency", "4", "--out", str(out)]
    s = _summary(cmd, out)
    one, split = (r["kinds"]["jpeg256-none"] for r in s["results"])
    assert set(one["by_role"]) == {"server"} and {"front ends", "engine process"} <= set(split["by_role"])
    for figures in (one, split):
        assert figures["requests"] == 24
        # the batches the counted posts made, from /metrics (warm-ups and the warm-up posts left out)
        assert 1 <= figures["batches"] <= 24 and 1 <= figures["mean_batch"] <= 4, figures
        # a 256 px JPEG through the whole front end: millions of instructions, some in copies
        assert 1e6 < figures["instructions_per_image"] < 1e8, figures
        assert 0 < figures["copied_per_image"] < figures["instructions_per_image"], figures
        assert sum(v["instructions_per_image"] for v in figures["by_role"].values()) == pytest.approx(
            figures["instructions_per_image"], abs=len(figures["by_role"]))
    # the engine process copies (inputs out of the slots, maps into them) and does little else
    engine, front = split["by_role"]["engine process"], split["by_role"]["front ends"]
    assert engine["copied_per_image"] > 0
    assert 0 < engine["instructions_per_image"] - engine["copied_per_image"] < (
        front["instructions_per_image"] - front["copied_per_image"]) / 4, split
    assert "| jpeg256-none | api=2 |" in (out / "summary.md").read_text()
    refused = subprocess.run([sys.executable, "-m", "loadtests.instructions", "--store", str(model_store),
                              "--modes", "one", "servers=2", "--out", str(tmp_path / "refused")], cwd=ROOT,
                             env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "unknown mode" in refused.stderr, refused.stderr[-500:]
    assert not (tmp_path / "refused").exists()


def test_redis_budget_benchmark_reports_memory_held_to_the_budget(tmp_path):
    """loadtests/redis_budgets.py, shortened: the flood's growth stays near each budget and
    far under what the unbounded store keeps; both kinds of write are timed."""
    import re
    import shutil as _shutil

    if _shutil.which("redis-server") is None:
        missing("redis-server is not installed: run scripts/install-redis.sh")
    cmd = [sys.executable, "-m", "loadtests.redis_budgets", "--links", "150", "--budgets-mib", "1",
           "--puts", "300", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    grown = [float(m) for m in re.findall(r"^\| [^|]+ \| ([\d.]+) MB \|$", proc.stdout, re.M)]
    assert len(grown) == 2 and grown[0] < 2.0 and grown[1] > 2.5, proc.stdout  # 150 x 20 KB = 3 MB
    assert re.search(r"^\| 1 \| plain SET .* \| 300 \|$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\| 1 \| budgeted .* \| 300 \|$", proc.stdout, re.M), proc.stdout
