"""Async jobs end to end: ``msflow serve`` + two ``msflow worker`` subprocesses on a real
redis-server: the flow, a worker frozen (SIGSTOP) then SIGKILLed mid-job, a poison job,
idempotent writes, and no Redis -> 503."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from service.config import Settings

from harness import (REDIS_ADMIN_KEY, REDIS_USER_KEY, assert_error, CATEGORY, PREFIX, RedisServer, Server, WorkerProc, client_for,
                     free_port, metric,
                     png_of, png_variant, upload, wait_until)

MAX_ATTEMPTS = 3
CLAIM_IDLE_S = 1.0


@pytest.fixture(scope="module")
def workers(redis_store: Path, redis_server: RedisServer, redis_apis: dict[str, Server],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProc]]:
    logs = tmp_path_factory.mktemp("worker-logs")
    procs = {name: WorkerProc(redis_store, logs / f"{name}.log", name, redis_url=redis_server.url, redis_prefix=PREFIX, job_claim_idle_s=CLAIM_IDLE_S,
                              job_max_attempts=MAX_ATTEMPTS, worker_block_s=0.5, max_batch_size=8,
                              log_level="info", **({"worker_metrics_port": free_port(), "host": "127.0.0.1"}
                                                   if name == "w1" else {}))
             for name in ("w1", "w2")}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def api(redis_apis: dict[str, Server]) -> Iterator[httpx.Client]:
    with client_for(redis_apis["plain"]) as c:
        yield c


def submit(api: httpx.Client, files: list[Any], **params: str) -> str:
    r = api.post(f"/v1/jobs/{CATEGORY}", files=files, params=params)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and r.headers["location"] == body["url"] == f"/v1/jobs/{body['id']}"
    return body["id"]


def wait_status(api: httpx.Client, job_id: str, statuses: set[str], timeout: float = 30.0) -> dict[str, Any]:
    def poll() -> dict[str, Any] | None:
        r = api.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json() if r.json()["status"] in statuses else None

    return wait_until(poll, timeout, f"job {job_id} to be {statuses}")


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_worker_metrics_listen_on_msflow_host_only(workers: dict[str, WorkerProc]) -> None:
    """The worker's Prometheus port binds MSFLOW_HOST, as the API does (prometheus-client's
    default is every interface: 0.0.0.0 with MSFLOW_HOST=127.0.0.1)."""
    port = int(workers["w1"].settings["worker_metrics_port"])
    assert wait_until(lambda: listening_addresses(port) or None, 10, "the worker's metrics port") == {"127.0.0.1"}
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "msflow_jobs_total" in body or "# HELP msflow_jobs" in body


def test_an_idempotency_key_sent_with_another_image_is_409(api: httpx.Client, good_images: list[Path]) -> None:
    """Over HTTP: the same key and image give the same job; the key with another image is 409
    idempotency_key_reused (before, 202 with the first job, whose result is another part's)."""
    a, b = png_variant(good_images[0], "idem-a"), png_variant(good_images[1], "idem-b")
    key = {"Idempotency-Key": f"part-{time.monotonic_ns()}"}
    queued = metric(api, "msflow_jobs_total", category=CATEGORY, outcome="queued")
    first = api.post(f"/v1/jobs/{CATEGORY}", files=[upload("a.png", a)], headers=key)
    again = api.post(f"/v1/jobs/{CATEGORY}", files=[upload("a.png", a)], headers=key)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    # One job queued: the resubmission counted again read as two on msflow_jobs_total.
    assert metric(api, "msflow_jobs_total", category=CATEGORY, outcome="queued") == queued + 1
    error = assert_error(api.post(f"/v1/jobs/{CATEGORY}", files=[upload("a.png", b)], headers=key), 409,
                         "idempotency_key_reused")
    assert first.json()["id"] in error["message"]


def test_an_idempotency_key_belongs_to_the_client_that_sent_it(redis_apis: dict[str, Server],
                                                               good_images: list[Path]) -> None:
    """Two clients (two API keys) using the same Idempotency-Key get two jobs. The job id was
    derived from the category and the key alone: a client who guessed another's key read that
    job's results at /v1/jobs/<id>, and its own request made the owner's a 409."""
    a, b = png_variant(good_images[2], "scope-a"), png_variant(good_images[3], "scope-b")
    key = f"order-{time.monotonic_ns()}"
    with client_for(redis_apis["cached"]) as c:
        def post(image: bytes, api_key: str) -> httpx.Response:
            return c.post(f"/v1/jobs/{CATEGORY}", files=[upload("p.png", image)],
                          headers={"Idempotency-Key": key, "X-API-Key": api_key})
        owner, other = post(a, REDIS_USER_KEY), post(b, REDIS_ADMIN_KEY)
        assert owner.status_code == other.status_code == 202, (owner.text, other.text)
        assert owner.json()["id"] != other.json()["id"]
        again = post(a, REDIS_USER_KEY)  # the owner's resubmission still finds its own job
        assert again.status_code == 202 and again.json()["id"] == owner.json()["id"]


def test_a_job_answers_only_the_client_that_submitted_it(redis_apis: dict[str, Server],
                                                         workers: dict[str, WorkerProc],
                                                         good_images: list[Path]) -> None:
    """GET /v1/jobs/<id> with another API key is 404 job_not_found, as for a job that never
    existed, queued and done (the worker's record keeps its owner). Before, any valid key read
    any job whose id it had seen (an access log, a shared ticket): its results, file names and
    heatmap links (200 for the other key)."""
    with client_for(redis_apis["cached"]) as c:
        r = c.post(f"/v1/jobs/{CATEGORY}", files=[upload("mine.png", png_variant(good_images[4], "owner"))],
                   headers={"X-API-Key": REDIS_USER_KEY})
        assert r.status_code == 202, r.text
        url = r.headers["location"]
        mine = c.get(url, headers={"Authorization": f"Bearer {REDIS_USER_KEY}"})  # the same key, either header
        assert mine.status_code == 200 and mine.json()["id"] == r.json()["id"]
        assert_error(c.get(url, headers={"X-API-Key": REDIS_ADMIN_KEY}), 404, "job_not_found")
        wait_until(lambda: c.get(url, headers={"X-API-Key": REDIS_USER_KEY}).json()["status"] == "done" or None, 30,
                   "the job to be done")
        assert_error(c.get(url, headers={"X-API-Key": REDIS_ADMIN_KEY}), 404, "job_not_found")


def test_on_an_open_api_a_bearer_header_does_not_make_a_client(api: httpx.Client, good_images: list[Path]) -> None:
    """Without MSFLOW_API_KEYS every request is the same client, whatever Authorization it
    carries (a gateway's token for another service, renewed every few minutes): the job is
    polled and its Idempotency-Key resubmitted under another token. The key presented was
    the client even there: the poll was 404 and the resubmission queued a second job."""
    image = png_variant(good_images[5], "open-bearer")
    key = {"Idempotency-Key": f"open-{time.monotonic_ns()}"}
    first = api.post(f"/v1/jobs/{CATEGORY}", files=[upload("o.png", image)],
                     headers={**key, "Authorization": "Bearer gateway-token-1"})
    assert first.status_code == 202, first.text
    again = api.post(f"/v1/jobs/{CATEGORY}", files=[upload("o.png", image)],
                     headers={**key, "Authorization": "Bearer gateway-token-2"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"], again.text
    polled = api.get(first.headers["location"], headers={"X-API-Key": "something-else"})
    assert polled.status_code == 200 and polled.json()["id"] == first.json()["id"], polled.text


# ---------------------------------------------------------------------- the flow
def test_jobs_end_to_end_with_two_workers(api: httpx.Client, workers: dict[str, WorkerProc],
                                          good_images: list[Path]) -> None:
    images = [png_variant(p, "job") for p in good_images[:4]]
    three = submit(api, [upload(f"{i}.png", images[i]) for i in range(3)])  # inline heatmaps (default)
    linked = submit(api, [upload("3.png", images[3])], heatmap="url")
    bare = [submit(api, [upload(f"{i}.png", images[i])], heatmap="none") for i in range(4)]
    done = {j: wait_status(api, j, {"done", "failed"}) for j in [three, linked, *bare]}
    assert {d["status"] for d in done.values()} == {"done"}, done
    assert {d["worker"] for d in done.values()} <= {"w1", "w2"}
    # the same result shape and numbers as the synchronous API
    sync = api.post(f"/v1/inspect/{CATEGORY}", files=[upload(f"{i}.png", images[i]) for i in range(3)]).json()
    result = done[three]["result"]
    assert set(result) == set(sync) and result["category"] == CATEGORY
    for got, want in zip(result["results"], sync["results"]):
        assert set(got) == set(want)
        for key in ("index", "filename", "threshold", "is_anomalous", "model_version", "image_size"):
            assert got[key] == want[key], key
        assert abs(got["score"] - want["score"]) < 1e-5
        assert Image.open(io.BytesIO(base64.b64decode(got["heatmap"]["data"]))).size == (128, 128)
    assert all(r["batch_size"] >= 3 for r in result["results"])  # one engine batch for the whole job
    heat = done[linked]["result"]["results"][0]["heatmap"]
    png = api.get(heat["url"])  # written by the worker, served by the API
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    # A job's link lives as long as the job's record (MSFLOW_JOB_TTL_S from its end), not the
    # MSFLOW_HEATMAP_TTL_S of a synchronous answer's: a result read the next day had dead links.
    record_ends = datetime.fromisoformat(done[linked]["updated_at"]).timestamp() + Settings.model_fields["job_ttl_s"].default
    assert datetime.fromisoformat(heat["expires_at"]).timestamp() >= record_ends - 60, (heat, done[linked])
    assert all(done[j]["result"]["results"][0]["heatmap"] is None for j in bare)
    assert all(d["attempts"] == 1 and d["error"] is None for d in done.values())
    assert_error(api.get("/v1/jobs/" + "n" * 24), 404, "job_not_found")


def test_a_resubmitted_key_answers_its_job_as_it_stands(api: httpx.Client, workers: dict[str, WorkerProc],
                                                        good_images: list[Path]) -> None:
    """The same request and Idempotency-Key after the job finished: 202 with its status done
    (before, "queued": a client polling only while queued waited on a finished job)."""
    image = png_variant(good_images[0], "resubmit-done")
    key = {"Idempotency-Key": f"done-{time.monotonic_ns()}"}
    first = api.post(f"/v1/jobs/{CATEGORY}", files=[upload("a.png", image)], params={"heatmap": "none"}, headers=key)
    assert first.status_code == 202 and first.json()["status"] == "queued", first.text
    wait_status(api, first.json()["id"], {"done"})
    again = api.post(f"/v1/jobs/{CATEGORY}", files=[upload("a.png", image)], params={"heatmap": "none"}, headers=key)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "done", again.text


def _running_record(r: Any, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The job's record once a worker has marked it running, read from Redis directly (every
    millisecond: the job must still be running when the caller acts on it)."""
    key = f"{PREFIX}job:{job_id}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = r.get(key)
        record = json.loads(raw) if raw else {}
        if record.get("status") in {"running", "done", "failed"}:
            return record
        time.sleep(0.001)
    raise AssertionError(f"job {job_id} never ran")


def test_stopped_worker_job_completed_by_the_other(api: httpx.Client, workers: dict[str, WorkerProc],
                                                   redis_server: RedisServer, good_images: list[Path]) -> None:
    """A real fault mid-job: the worker running it is frozen (SIGSTOP), so its keep-alive stops;
    the other worker claims the job after job_claim_idle_s and completes it; the frozen one
    is then SIGKILLed. The job completes exactly once, by the other worker."""
    r = redis_server.client()
    # Large uploads, heatmaps at their size over them: a job that runs long enough (a few
    # hundred ms) to be caught while it runs.
    big = Image.open(good_images[5]).convert("RGB").resize((768, 768))
    victim: WorkerProc | None = None
    try:
        for attempt in range(3):
            files = [upload(f"slow-{attempt}-{k}.png", png_of(big.rotate(90 * k))) for k in range(6)]
            job = submit(api, files, heatmap_size="original", overlay="true")
            running = _running_record(r, job)
            if running["status"] != "running":
                continue  # finished before we looked: try another job
            victim = workers[running["worker"]]
            os.kill(victim.proc.pid, signal.SIGSTOP)
            now = json.loads(r.get(f"{PREFIX}job:{job}"))
            if now["status"] == "running" and now["worker"] == victim.name:
                break
            os.kill(victim.proc.pid, signal.SIGCONT)  # it finished just before the stop landed
            victim = None
        assert victim is not None, "never caught a job while it ran"
        survivor = next(w for w in workers.values() if w is not victim)
        # The frozen worker's claim goes stale; the survivor takes the job over.
        wait_until(lambda: json.loads(r.get(f"{PREFIX}job:{job}"))["worker"] == survivor.name, 30,
                   "the survivor to claim the job")
        victim.proc.send_signal(signal.SIGKILL)  # it never resumes: the claim was the survivor's to finish
        assert victim.proc.wait(10) == -signal.SIGKILL
        done = wait_status(api, job, {"done", "failed"}, timeout=30)
        assert done["status"] == "done" and done["worker"] == survivor.name, done
        assert done["attempts"] == 2 and [x["filename"] for x in done["result"]["results"]] == [
            f"slow-{attempt}-{k}.png" for k in range(6)]
        assert done["result"]["results"][0]["image_size"] == {"width": 768, "height": 768}
        assert "claimed 1 job(s)" in survivor.log()
        assert r.xpending(f"{PREFIX}jobs:{CATEGORY}", "workers")["pending"] == 0  # acknowledged once
    finally:
        if victim is not None and victim.proc.poll() is None:  # a failed assertion: do not leave it frozen
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.send_signal(signal.SIGCONT)
            victim.proc.wait(10)


def test_poison_job_goes_to_the_dead_letter_stream(api: httpx.Client, workers: dict[str, WorkerProc],
                                                   redis_server: RedisServer, good_images: list[Path]) -> None:
    whole = good_images[6].read_bytes()
    job = submit(api, [upload("poison.png", whole[: len(whole) // 2])])  # header fine, pixels truncated
    failed = wait_status(api, job, {"done", "failed"}, timeout=30)
    assert failed["status"] == "failed" and failed["attempts"] == 1, failed  # undecodable: not retried
    assert failed["error"]["code"] == "undecodable_image" and "poison.png" in failed["error"]["message"]
    r = redis_server.client()
    dead = [f for _, f in r.xrange(f"{PREFIX}jobs:dead-letter") if f[b"job_id"] == job.encode()]
    assert len(dead) == 1 and dead[0][b"attempts"] == b"1"
    assert dead[0][b"error_code"] == b"undecodable_image"
    assert r.xpending(f"{PREFIX}jobs:{CATEGORY}", "workers")["pending"] == 0  # acknowledged
    assert not r.exists(f"{PREFIX}job:{job}:images")  # inputs dropped with the final state
    # the API refuses what it can tell from the header, at once
    assert_error(api.post(f"/v1/jobs/{CATEGORY}", files=[upload("t.txt", b"not an image")]), 415,
                 "unsupported_media_type")


def test_result_writes_are_idempotent(api: httpx.Client, workers: dict[str, WorkerProc], redis_server: RedisServer,
                                      good_images: list[Path]) -> None:
    from service.config import Settings
    from service.redisq.jobs import JobMessage, JobQueue
    from service.redisq.connection import RedisConnection
    from service.redisq.records import JobRecord

    # A finished job delivered again (a worker died between its write and its XACK): the
    # worker acknowledges it and leaves the record exactly as it was.
    job = submit(api, [upload("again.png", png_variant(good_images[7], "again"))], heatmap="none")
    first = wait_status(api, job, {"done"})
    r = redis_server.client()
    stored = r.get(f"{PREFIX}job:{job}")
    stream = f"{PREFIX}jobs:{CATEGORY}"
    again = r.xadd(stream, JobMessage(job_id=job, category=CATEGORY).fields())
    wait_until(lambda: r.xinfo_groups(stream)[0]["last-delivered-id"] == again and
               r.xpending(stream, "workers")["pending"] == 0, 10, "the redelivery to be acknowledged")
    assert r.get(f"{PREFIX}job:{job}") == stored and api.get(f"/v1/jobs/{job}").json() == first

    # The write itself: the first final state wins; later writes (final or not) change nothing.
    async def writes() -> None:
        settings = Settings(redis_url=redis_server.url, redis_prefix=PREFIX, model_store=Path("."))
        conn = RedisConnection(settings)
        records = JobQueue(settings, conn).records
        now = datetime.now(timezone.utc)
        base = JobRecord(id="i" * 24, category=CATEGORY, status="queued", created_at=now, updated_at=now,
                         filenames=["a.png"])
        gone = base.model_copy(update={"id": "j" * 24})
        assert await records.write(gone.model_copy(update={"status": "running"})) is False, \
            "a state that is not final never re-creates a record that is gone (nothing would run it)"
        assert await conn.client.exists(records.record_key(gone.id)) == 0
        await conn.client.set(records.record_key(base.id), base.model_dump_json(), px=records.ttl_ms)
        await conn.client.rpush(records.images_key(base.id), b"png")
        done = base.model_copy(update={"status": "done", "attempts": 1, "worker": "a"})
        assert await records.write(done) is True
        assert await records.write(done.model_copy(update={"worker": "b"})) is False
        assert await records.write(base.model_copy(update={"status": "running"})) is False
        assert await records.write(done.model_copy(update={"status": "failed"})) is False
        assert await records.get(base.id) == done
        assert await conn.client.exists(records.images_key(base.id)) == 0
        await conn.aclose()

    asyncio.run(writes())


# ---------------------------------------------------------------------- without Redis
def test_without_redis_jobs_answer_503_and_links_stay_in_process(redis_apis: dict[str, Server],
                                                                 good_images: list[Path]) -> None:
    with client_for(redis_apis["local"]) as c:
        err = assert_error(c.post(f"/v1/jobs/{CATEGORY}", files=[upload("a.png", good_images[0].read_bytes())]),
                           503, "redis_required")
        assert "MSFLOW_REDIS_URL" in err["message"]
        assert_error(c.get("/v1/jobs/" + "n" * 24), 503, "redis_required")
        assert c.get("/readyz").json()["redis"] == "disabled"
        r = c.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "url"}, files=[upload("a.png", good_images[0].read_bytes())])
        assert r.status_code == 200 and r.json()["results"][0]["cached"] is False
        link = r.json()["results"][0]["heatmap"]["url"]
        assert c.get(link).status_code == 200
