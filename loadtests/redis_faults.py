"""Redis faults, bounded: jobs done exactly once through stalls and a killed worker, and
threshold overrides that survive Redis losing its data.

    python -m loadtests.redis_faults --store model_store
    python -m loadtests.redis_faults --store model_store --jobs 24 --fail-on-violation

Starts its own ``redis-server`` (loopback, a free port, nothing on disk), one ``msflow serve``
and two ``msflow worker`` processes, and stops them all when done:

1. **Stalls and a kill.** ``--jobs`` jobs are submitted over HTTP while Redis is stalled
   again and again (``DEBUG SLEEP``, as a fork for an AOF rewrite would) for longer than the
   API's job socket timeout, so redis-py retries the submission. A client that gets no
   answer resubmits with the same ``Idempotency-Key``. Mid-way, the worker running a job is
   SIGKILLed and a new one started. Every job must end ``done``, with exactly as many
   stream entries ever added as jobs (``XINFO STREAM`` entries-added) and nothing
   dead-lettered: each job queued once and completed once.
2. **FLUSHALL.** A threshold override is set (admin key), then Redis drops every key. The
   override must stay in force on the API throughout and be back in Redis within 5 s.

Writes ``summary.json`` and ``summary.md``; exit status 1 with ``--fail-on-violation`` when a
rule is broken, 2 when a process could not start.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image

from loadtests.redis_proc import RedisProc
from loadtests.run import LocalServer, wait_ready

ADMIN_KEY = "faults-admin-key"
PREFIX = "msflow-faults:"


class Worker:
    def __init__(self, store: Path, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        self.proc = subprocess.Popen([sys.executable, "-m", "msflow.cli", "worker", "--store", str(store),
                                      "--name", name], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}")
            if b"consuming" in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not consuming after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def images(count: int, size: int = 512) -> list[bytes]:
    """Real texture crops (scikit-image's brick), large enough that a job runs a while."""
    from skimage import data as skdata

    texture = np.asarray(Image.fromarray(np.asarray(skdata.brick())).convert("RGB"))
    out = []
    for k in range(count):
        y, x = (k * 29) % (texture.shape[0] - 256), (k * 41) % (texture.shape[1] - 256)
        crop = Image.fromarray(texture[y:y + 256, x:x + 256]).resize((size, size))
        buf = io.BytesIO()
        crop.save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


class Staller(threading.Thread):
    """``DEBUG SLEEP seconds`` every ``every_s`` until stopped."""

    def __init__(self, r: RedisProc, seconds: float, every_s: float) -> None:
        super().__init__(daemon=True)
        self.client, self.seconds, self.every_s = r.client(timeout=seconds + 10), seconds, every_s
        self.stop = threading.Event()
        self.count = 0  # stalls ended
        self.started = 0  # stalls begun

    def wait_started(self, stalls: int, timeout: float) -> None:
        """Until ``stalls`` stalls have begun (or ``timeout``)."""
        end = time.monotonic() + timeout
        while self.started < stalls and time.monotonic() < end and self.is_alive():
            time.sleep(0.01)

    def run(self) -> None:
        while not self.stop.is_set():
            self.started += 1
            # Alternately past the API's job socket timeout (redis-py retries the script) and past
            # twice it (the API answers 503 and the client resubmits with its Idempotency-Key).
            self.client.execute_command("DEBUG", "SLEEP", str(self.seconds * (1 + self.count % 2)))
            self.count += 1
            self.stop.wait(self.every_s * random.uniform(0.5, 1.0))


def submit_with_retries(api: httpx.Client, category: str, key: str, files: list[Any], violations: list[str],
                        tries: list[int]) -> str:
    """POST until a 202, always with the same Idempotency-Key (a client that lost its answer)."""
    last = ""
    for attempt in range(30):
        tries.append(attempt)
        try:
            r = api.post(f"/v1/jobs/{category}", files=files, params={"heatmap_size": "original", "overlay": "true"},
                         headers={"Idempotency-Key": key})
        except httpx.HTTPError as exc:  # no answer: resubmit
            last = repr(exc)
            continue
        if r.status_code == 202:
            return str(r.json()["id"])
        if r.status_code == 503 and r.headers.get("retry-after"):
            last = r.text[:200]
            time.sleep(0.2)
            continue
        violations.append(f"submission {key}: {r.status_code} {r.text[:200]}")
        break
    raise RuntimeError(f"submission {key} never accepted: {last}")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or f"reports/redis-faults-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="msflow-faults-"))
    store = work / "store"
    shutil.copytree(args.store, store)  # the FLUSHALL step writes an override file beside the manifests
    category = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    rds = RedisProc(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSFLOW_")}
    env.update({"MSFLOW_REDIS_URL": rds.url, "MSFLOW_REDIS_PREFIX": PREFIX, "MSFLOW_DEVICE": "cpu",
                "MSFLOW_JOB_CLAIM_IDLE_S": "2", "MSFLOW_WORKER_BLOCK_S": "0.5", "MSFLOW_LOG_LEVEL": "info",
                "MSFLOW_THRESHOLD_SYNC_S": str(args.threshold_sync_s), "MSFLOW_STORE_POLL_S": "0"})
    violations: list[str] = []
    workers: dict[str, Worker] = {}
    summary: dict[str, Any] = {"jobs": args.jobs, "category": category, "stall_s": args.stall_s}
    try:
        server_env = {k: v for k, v in env.items() if k.startswith("MSFLOW_")}
        server_env.update({"MSFLOW_ADMIN_API_KEYS": ADMIN_KEY, "MSFLOW_ACCESS_LOG": "false"})
        with LocalServer(str(store), out / "server.log", env=server_env) as server:
            wait_ready(server.url, server.proc, timeout=180)
            for name in ("w1", "w2"):
                workers[name] = Worker(store, name, env, out / f"{name}.log")
            for w in workers.values():
                w.wait_ready()
            r = rds.client()
            pictures = images(4)
            staller = Staller(rds, args.stall_s, every_s=args.stall_s)
            staller.start()
            ids: list[str] = []
            tries: list[int] = []
            killed: str | None = None
            with httpx.Client(base_url=server.url, timeout=30) as api:
                stalled = (2 * args.jobs) // 3
                for k in range(args.jobs):
                    if k == stalled:  # the rest go in at once, and a worker dies running one of them
                        staller.stop.set()
                        staller.join(3 * args.stall_s + 10)
                    if k == stalled - 1:
                        # The last one goes in once the second stall began: with few jobs (--jobs 4)
                        # all were in before it, and the run counted the drill's own gap as a violation.
                        staller.wait_started(2, timeout=4 * args.stall_s + 10)
                    files = [("file", (f"j{k}-{i}.png", pictures[(k + i) % len(pictures)], "image/png"))
                             for i in range(3)]
                    ids.append(submit_with_retries(api, category, f"fault-job-{k}", files, violations, tries))
                    if k < stalled:
                        time.sleep(args.stall_s / 4)  # submissions spread over several stalls
                killed = kill_running(r, ids[stalled:], workers, store, env, out)
                summary["stalls"] = staller.count
                summary["resubmissions"] = sum(1 for t in tries if t > 0)
                if staller.count < 2:
                    violations.append(f"only {staller.count} stalls happened during the submissions")
                summary["killed_worker"] = killed
                final = wait_final(r, ids, timeout=args.timeout)
                statuses = {job: rec.get("status") for job, rec in final.items()}
                summary["statuses"] = {s: list(statuses.values()).count(s) for s in set(statuses.values())}
                summary["attempts"] = sorted(rec.get("attempts", 0) for rec in final.values())
                added = int(r.xinfo_stream(f"{PREFIX}jobs:{category}")["entries-added"])
                dead = r.xlen(f"{PREFIX}jobs:dead-letter") if r.exists(f"{PREFIX}jobs:dead-letter") else 0
                summary.update({"distinct_jobs": len(set(ids)), "stream_entries_added": added, "dead_lettered": dead})
                if set(statuses.values()) != {"done"}:
                    violations.append(f"not every job is done: {summary['statuses']}")
                if added != len(set(ids)) or len(set(ids)) != args.jobs:
                    violations.append(f"{args.jobs} jobs, {len(set(ids))} ids, {added} stream entries added")
                if dead:
                    violations.append(f"{dead} dead-lettered")
                if killed is None:
                    violations.append("no worker was caught mid-job to kill")
                summary["flushall"] = flushall_step(api, r, category, violations)
    finally:
        for w in workers.values():
            w.stop()
        rds.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary["violations"] = violations
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = render(summary)
    (out / "summary.md").write_text(md)
    print(md)
    return 1 if violations and args.fail_on_violation else 0


def kill_running(r: redis.Redis, ids: list[str], workers: dict[str, Worker], store: Path, env: dict[str, str],
                 out: Path) -> str | None:
    """SIGKILL the worker running one of ``ids`` (as soon as one runs), start a replacement."""
    end = time.monotonic() + 20
    while time.monotonic() < end:
        for job in ids:
            raw = r.get(f"{PREFIX}job:{job}")
            record = json.loads(raw) if raw else {}
            victim = workers.get(record.get("worker", ""))
            if record.get("status") == "running" and victim is not None and victim.proc.poll() is None:
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(10)
                name = f"{victim.name}-after"
                workers[name] = Worker(store, name, env, out / f"{name}.log")
                return victim.name
        time.sleep(0.002)
    return None


def wait_final(r: redis.Redis, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    end = time.monotonic() + timeout
    final: dict[str, dict[str, Any]] = {}
    while time.monotonic() < end and len(final) < len(set(ids)):
        for job in set(ids) - set(final):
            raw = r.get(f"{PREFIX}job:{job}")
            record = json.loads(raw) if raw else {}
            if record.get("status") in {"done", "failed"}:
                final[job] = record
        time.sleep(0.2)
    for job in set(ids) - set(final):
        final[job] = {"status": "unfinished"}
    return final


def flushall_step(api: httpx.Client, r: redis.Redis, category: str, violations: list[str]) -> dict[str, Any]:
    admin = {"X-API-Key": ADMIN_KEY}
    calibrated = float(api.get(f"/v1/models/{category}").json()["calibrated_threshold"])
    wanted = calibrated * 1.01 if calibrated > 0 else calibrated + 0.01
    for _ in range(50):  # as an operator's client would: a 503 with Retry-After (the API still
        # skipping Redis for a moment after the last stall) is retried, not a failure of the step
        put = api.put(f"/v1/models/{category}/threshold", json={"threshold": wanted, "force": True}, headers=admin)
        if put.status_code != 503 or not put.headers.get("retry-after"):
            break
        time.sleep(0.2)
    if put.status_code != 200:
        violations.append(f"PUT threshold: {put.status_code} {put.text[:200]}")
        return {}
    r.flushall()
    t0 = time.monotonic()
    restored_after: float | None = None
    reverted = 0
    while time.monotonic() - t0 < 8.0:
        served = api.get(f"/v1/models/{category}").json()["threshold"]
        if abs(float(served) - wanted) > 1e-9:
            reverted += 1
        if restored_after is None and any(True for _ in r.scan_iter(match=f"{PREFIX}threshold*", count=100)):
            restored_after = time.monotonic() - t0
        time.sleep(0.05)
    if reverted:
        violations.append(f"the served threshold reverted in {reverted} reads after FLUSHALL")
    if restored_after is None or restored_after > 5.0:
        violations.append(f"the override was not back in Redis within 5 s ({restored_after})")
    api.delete(f"/v1/models/{category}/threshold", headers=admin)
    return {"threshold": wanted, "restored_in_redis_after_s": restored_after, "reverted_reads": reverted}


def render(s: dict[str, Any]) -> str:
    f = s.get("flushall") or {}
    return "\n".join([
        "# Redis faults", "",
        f"- {s['jobs']} jobs of 3 images on `{s['category']}` submitted through {s.get('stalls', 0)} Redis stalls "
        f"of {s['stall_s']} s ({s.get('resubmissions')} client resubmissions with the same Idempotency-Key); "
        f"worker `{s.get('killed_worker')}` SIGKILLed mid-job and replaced",
        f"- final: {s.get('statuses')}; attempts {s.get('attempts')}; {s.get('distinct_jobs')} distinct jobs, "
        f"{s.get('stream_entries_added')} stream entries ever added, {s.get('dead_lettered')} dead-lettered",
        f"- FLUSHALL: override back in Redis after {f.get('restored_in_redis_after_s')} s; served threshold "
        f"reverted in {f.get('reverted_reads')} reads",
        "", "Violations: " + ("none" if not s["violations"] else ""), *[f"- {v}" for v in s["violations"]], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="model_store")
    p.add_argument("--jobs", type=int, default=24, help="at least 2: one submitted through the stalls, one "
                   "after them for a worker to be killed running")
    p.add_argument("--stall-s", type=float, default=2.0, help="each DEBUG SLEEP: over the API's job socket timeout")
    p.add_argument("--threshold-sync-s", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds for every job to end")
    p.add_argument("--out")
    p.add_argument("--fail-on-violation", action="store_true")
    args = p.parse_args(argv)
    if args.jobs < 2:
        p.error("--jobs must be at least 2")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
