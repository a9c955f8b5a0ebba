"""The Locust load test: ``python -m loadtests.run``'s report from Locust's CSV files and its
refusal when nothing listens, the locustfile's helpers (offline), and a short headless Locust
run through ``--serve`` against a real ``msflow serve`` (the exported test model, the demo
test images).

The smoke run posts real images for ~10 s with 4 users and fails on any failed request; it
is a check that the load test and the service agree, not a benchmark.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness import CATEGORY
from loadtest_fixtures import ROOT, _clean_env


def _load_runner():
    """loadtests/run.py as a module (it imports nothing from Locust)."""
    spec = importlib.util.spec_from_file_location("loadtests_run", ROOT / "loadtests" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


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


def test_runner_rates_are_over_the_run_not_the_stop_timeout(tmp_path):
    """Locust divides every count by its whole window, which job polls running on through
    --stop-timeout stretch (a job with no worker polled 9 s past a 4 s run: 141 images in
    4 s were reported as 10.8/s, not ~35/s); the runner's rates are over the run itself."""
    run = _load_runner()
    with open(tmp_path / "locust_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STATS_HEADER)  # the counts of that run; Locust's rates over its 13 s window
        w.writerow(_stats_row("POST", "/v1/inspect/[category]?heatmap=none", 75, 0, 75 / 13, 70, 290, 320))
        w.writerow(_stats_row("GET", "/v1/jobs/[id]", 648, 0, 648 / 13, 7, 14, 17))
        w.writerow(_stats_row("", "Aggregated", 723, 0, 723 / 13, 7, 110, 290))
    s = run.summarize(tmp_path / "locust", run_seconds=4.0)
    assert s["images_per_s"] == pytest.approx(75 / 4)
    assert s["requests_per_s"] == pytest.approx(723 / 4)
    assert s["window_s"] == pytest.approx(4.0)
    # a run whose requests all ended within its time keeps Locust's window
    s = run.summarize(tmp_path / "locust", run_seconds=30.0)
    assert s["images_per_s"] == pytest.approx(75 / 13) and s["window_s"] == pytest.approx(13.0)


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
