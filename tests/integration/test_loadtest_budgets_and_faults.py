"""The load-test drills that hold the service to its budgets and through faults, shortened:
PNG bombs from hostile clients (``loadtests.hostile``), Redis stalls, a killed worker and a
FLUSHALL (``loadtests.redis_faults``), and a flood of heatmap links under Redis memory budgets
(``loadtests.redis_budgets``). Each runs as the operator runs it, in a subprocess."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import missing
from loadtest_fixtures import ROOT, _clean_env
from service.pipeline.decode_memory import PRICED_PIXEL_BYTES


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
    assert hostile["x2:200"] >= 1, s["answers"]  # what fits the budget is served
    assert s["answers"]["ordinary"]["x1:200"] >= 3 and set(s["answers"]["ordinary"]) == {"x1:200"}
    assert s["peak_rss_mb"] <= s["bound_mb"] == pytest.approx(s["baseline_rss_mb"] + 200 * PRICED_PIXEL_BYTES, abs=0.2)


def _faults_env() -> dict[str, str]:
    return _clean_env(MSFLOW_INTRA_OP_THREADS="1", MSFLOW_DECODE_THREADS="2")


def _redis_faults(model_store: Path, tmp_path: Path, jobs: int) -> tuple[subprocess.CompletedProcess[str], dict, str]:
    """``loadtests.redis_faults`` shortened (2 s stalls) with ``jobs`` jobs: the process, its
    summary and the end of its output."""
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed: run scripts/install-redis.sh")
    out = tmp_path / "faults"
    cmd = [sys.executable, "-m", "loadtests.redis_faults", "--store", str(model_store), "--jobs", str(jobs),
           "--stall-s", "2", "--fail-on-violation", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_faults_env(), capture_output=True, text=True, timeout=400)
    logs = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "summary.json").exists(), logs
    return proc, json.loads((out / "summary.json").read_text()), logs


def test_redis_fault_scenario_every_job_once_and_overrides_survive_flushall(model_store, tmp_path):
    """loadtests/redis_faults.py, shortened: submissions through repeated Redis stalls (the
    client resubmitting with its Idempotency-Key when the API answers 503), a worker
    SIGKILLed mid-job, then FLUSHALL. Every job done, each queued once; the threshold
    override never reverts and is back in Redis within 5 s.

    With few jobs (3: two through the stalls, one after them for the kill) every submission
    used to be in before the second stall began, and the run reported "only 1 stalls happened
    during the submissions": a violation of the drill, not of the service. The last job
    submitted through the stalls now waits for the second one."""
    proc, s, logs = _redis_faults(model_store, tmp_path, jobs=3)
    assert proc.returncode == 0, logs
    assert s["violations"] == [] and s["statuses"] == {"done": 3}, logs
    assert s["stream_entries_added"] == s["distinct_jobs"] == 3 and s["dead_lettered"] == 0
    assert s["stalls"] >= 2 and s["killed_worker"] in {"w1", "w2"}
    assert s["flushall"]["reverted_reads"] == 0 and s["flushall"]["restored_in_redis_after_s"] <= 5.0
    refused = subprocess.run([sys.executable, "-m", "loadtests.redis_faults", "--jobs", "1"], cwd=ROOT,
                             env=_faults_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--jobs must be at least 2" in refused.stderr


def test_redis_budget_benchmark_reports_memory_held_to_the_budget(tmp_path):
    """loadtests/redis_budgets.py, shortened: the flood's growth stays near each budget and
    far under what the unbounded store keeps; both kinds of write are timed."""
    import re

    if shutil.which("redis-server") is None:
        missing("redis-server is not installed: run scripts/install-redis.sh")
    cmd = [sys.executable, "-m", "loadtests.redis_budgets", "--links", "150", "--budgets-mib", "1",
           "--puts", "300", "--rounds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    grown = [float(m) for m in re.findall(r"^\| [^|]+ \| ([\d.]+) MB \|$", proc.stdout, re.M)]
    assert len(grown) == 2 and grown[0] < 2.0 and grown[1] > 2.5, proc.stdout  # 150 x 20 KB = 3 MB
    assert re.search(r"^\| 1 \| plain SET .* \| 300 \|$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^\| 1 \| budgeted .* \| 300 \|$", proc.stdout, re.M), proc.stdout
