"""The job streams against a real redis-server, in-process: a submission retried by the
client after a stalled Redis is still one job, dead-lettering is idempotent, finished jobs
leave the stream, and the backlog is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import redis

from harness import RedisServer
from service.config import Settings
from service.redisq.connection import RedisConnection
from service.redisq.jobs import GROUP, BacklogFull, IdempotencyConflict, IdempotentJobUnreadable, JobQueue
from service.schemas import ErrorBody, InspectOptions, Upload

PREFIX = "msflow-streams:"


def _queue(private_redis: RedisServer, **settings: object) -> JobQueue:
    s = Settings(redis_url=private_redis.url, redis_prefix=PREFIX, redis_socket_timeout_s=0.25, redis_retries=1,
                 **settings)
    return JobQueue(s, RedisConnection(s, breaker_s=0.0))


class _Stall(threading.Thread):
    """Redis busy for ``seconds`` (as during a fork or a slow command): replies come late."""

    def __init__(self, private_redis: RedisServer, seconds: float) -> None:
        super().__init__()
        self.client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_timeout=seconds + 5)
        self.seconds, self.error = seconds, None
        self.start()
        time.sleep(0.05)  # the sleep has begun before the caller sends its command

    def run(self) -> None:
        try:
            self.client.execute_command("DEBUG", "SLEEP", str(self.seconds))
        except Exception as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        assert self.error is None, f"DEBUG SLEEP failed: {self.error}"


UPLOADS = [Upload(filename="a.png", data=b"\x89PNG" + b"x" * 1000)]


def test_a_submission_retried_after_a_stall_is_one_job(private_redis: RedisServer) -> None:
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis)
        records = []
        for _ in range(3):
            stall = _Stall(private_redis, 0.4)  # longer than the 0.25 s socket timeout: the client retries
            records.append(await queue.submit("brick", UPLOADS, InspectOptions(), None))
            stall.join()
        await queue.conn.aclose()
        stream = r.xrange(f"{PREFIX}jobs:brick")
        assert len(stream) == 3, stream  # one entry per submission, not one per attempt
        assert sorted(f[b"job_id"].decode() for _, f in stream) == sorted(rec.id for rec in records)
        for rec in records:
            assert r.llen(f"{PREFIX}job:{rec.id}:images") == 1  # the images once, not twice

    asyncio.run(scenario())


def test_dead_lettering_is_idempotent_and_finished_jobs_leave_the_stream(private_redis: RedisServer) -> None:
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis)
        await queue.ensure_groups(["brick"])
        a = await queue.submit("brick", UPLOADS, InspectOptions(), None)
        b = await queue.submit("brick", UPLOADS, InspectOptions(), None)
        deliveries = {d.job_id: d for d in await queue.read(["brick"], "w1", 10, 0.5)}
        assert set(deliveries) == {a.id, b.id}
        error = ErrorBody(code="undecodable_image", message="cannot decode a.png")
        for _ in range(2):  # as a retry after a lost reply would
            await queue.dead_letter(deliveries[a.id], a, error, "w1")
        dead = r.xrange(f"{PREFIX}jobs:dead-letter")
        assert [f[b"job_id"].decode() for _, f in dead] == [a.id]
        done = b.model_copy(update={"status": "done"})
        await queue.complete(deliveries[b.id], done)
        assert r.xlen(f"{PREFIX}jobs:brick") == 0  # both finished: the stream holds nothing
        assert r.xpending(f"{PREFIX}jobs:brick", GROUP)["pending"] == 0
        assert (await queue.records.get(a.id)).status == "failed"  # type: ignore[union-attr]
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_the_backlog_is_bounded(private_redis: RedisServer) -> None:
    async def scenario() -> None:
        queue = _queue(private_redis, job_max_backlog=2)
        await queue.submit("brick", UPLOADS, InspectOptions(), None)
        await queue.submit("brick", UPLOADS, InspectOptions(), None)
        with pytest.raises(BacklogFull):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        assert private_redis.client().xlen(f"{PREFIX}jobs:brick") == 2
        await queue.submit("grass", UPLOADS, InspectOptions(), None)  # per category
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_jobs_that_expired_unrun_leave_the_backlog(private_redis: RedisServer) -> None:
    """No worker ran them and their records expired: they no longer count as waiting (before,
    the stream kept them, "2 jobs are waiting", and every submission was refused for good)."""
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis, job_max_backlog=2, job_ttl_s=0.3)
        for _ in range(2):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        with pytest.raises(BacklogFull):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        await asyncio.sleep(0.4)
        assert await queue.records.get((await queue.submit("brick", UPLOADS, InspectOptions(), None)).id)
        assert r.xlen(f"{PREFIX}jobs:brick") == 1
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_queued_inputs_have_a_byte_budget_given_back_as_jobs_finish_or_expire(private_redis: RedisServer) -> None:
    """10,000 jobs of up to 64 MiB each were allowed per category: one client could fill Redis."""
    size = len(UPLOADS[0].data)
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis, job_max_backlog_bytes=2 * size + size // 2)
        await queue.ensure_groups(["brick"])
        first = await queue.submit("brick", UPLOADS, InspectOptions(), None)
        await queue.submit("brick", UPLOADS, InspectOptions(), None)
        with pytest.raises(BacklogFull, match="bytes"):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        assert r.xlen(f"{PREFIX}jobs:brick") == 2
        await queue.submit("grass", UPLOADS, InspectOptions(), None)  # per category
        # A finished job gives its bytes back (its final write drops its images), once.
        delivery = next(d for d in await queue.read(["brick"], "w1", 10, 0.5) if d.job_id == first.id)
        done = first.model_copy(update={"status": "done", "attempts": 1, "worker": "w1"})
        await queue.complete(delivery, done)
        await queue.complete(delivery, done)  # a repeated final write: no second refund
        assert int(r.hget(f"{PREFIX}jobs-inputs:brick:bytes", "#total")) == size
        await queue.submit("brick", UPLOADS, InspectOptions(), None)
        with pytest.raises(BacklogFull):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        await queue.conn.aclose()

        # Inputs whose time ran out unfinished (no worker took them) leave the budget too.
        short = _queue(private_redis, job_max_backlog_bytes=2 * size + size // 2, job_ttl_s=0.3)
        for _ in range(2):
            await short.submit("gravel", UPLOADS, InspectOptions(), None)
        with pytest.raises(BacklogFull):
            await short.submit("gravel", UPLOADS, InspectOptions(), None)
        await asyncio.sleep(0.4)
        for _ in range(2):
            await short.submit("gravel", UPLOADS, InspectOptions(), None)
        assert int(r.hget(f"{PREFIX}jobs-inputs:gravel:bytes", "#total")) == 2 * size
        assert r.zcard(f"{PREFIX}jobs-inputs:gravel:expiry") == 2
        await short.conn.aclose()

    asyncio.run(scenario())


def test_malformed_entries_are_dead_lettered_on_the_stream_they_came_from(private_redis: RedisServer) -> None:
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis)
        await queue.ensure_groups(["brick", "grass"])
        good = await queue.submit("brick", UPLOADS, InspectOptions(), None)
        r.xadd(f"{PREFIX}jobs:brick", {"foo": "bar"})  # no job id at all
        r.xadd(f"{PREFIX}jobs:brick", {"job_id": "x" * 24, "category": "grass"})  # names another stream
        got = await queue.read(["brick", "grass"], "w1", 10, 0.5)
        assert [d.job_id for d in got] == [good.id]  # the worker goes on with the good one
        dead = r.xrange(f"{PREFIX}jobs:dead-letter")
        assert [f[b"error_code"] for _, f in dead] == [b"malformed_entry", b"malformed_entry"]
        assert all(f[b"category"] == b"brick" for _, f in dead)  # buried where they came from
        assert b"grass" in dead[1][1][b"error_message"]
        pending = r.xpending(f"{PREFIX}jobs:brick", GROUP)["pending"]
        assert pending == 1  # only the good job, still in hand
        assert r.xpending(f"{PREFIX}jobs:grass", GROUP)["pending"] == 0
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_the_dead_letter_stream_is_bounded(private_redis: RedisServer) -> None:
    """Approximate trimming (MAXLEN ~) drops whole nodes of 100 entries: past the bound by
    far, the stream stays within one node of it."""
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis, dead_letter_max=10)
        await queue.ensure_groups(["brick"])
        error = ErrorBody(code="undecodable_image", message="cannot decode")
        for _ in range(3):
            for _ in range(100):
                await queue.submit("brick", UPLOADS, InspectOptions(), None)
            for d in await queue.read(["brick"], "w1", 100, 0.5):
                await queue.dead_letter(d, None, error, "w1")
        await queue.conn.aclose()

    asyncio.run(scenario())
    assert r.xlen(f"{PREFIX}jobs:brick") == 0
    assert 10 <= r.xlen(f"{PREFIX}jobs:dead-letter") <= 110  # 300 were dead-lettered


def test_dead_lettered_jobs_leave_nothing_behind_outside_the_budgets(private_redis: RedisServer) -> None:
    """Each dead-lettering left a marker key (its run seen, so that a retried call adds no
    second entry) for job_ttl_s: outside every budget, ~120 bytes of Redis per dead-lettered
    job for a day (6,000 dead-lettered: 6,000 markers, 0.7 MB, while their failed records kept
    within MSFLOW_JOB_MAX_RESULTS_BYTES and the stream within MSFLOW_DEAD_LETTER_MAX), so a
    client sending undecodable images filled Redis at its submission rate. Now a retried call
    knows its earlier run by the entry it dropped from the job stream."""
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis, dead_letter_max=1000, job_max_results_bytes=20_000)
        await queue.ensure_groups(["brick"])
        error = ErrorBody(code="undecodable_image", message="cannot decode a.png")
        for _ in range(200):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        for d in await queue.read(["brick"], "w1", 200, 0.5):
            record = await queue.records.get(d.job_id)
            for _ in range(2):  # as a retry after a lost reply would
                await queue.dead_letter(d, record, error, "w1")  # type: ignore[arg-type]
        await queue.conn.aclose()

    asyncio.run(scenario())
    assert r.xlen(f"{PREFIX}jobs:dead-letter") == 200  # each once
    assert r.xlen(f"{PREFIX}jobs:brick") == 0
    # Left: the failed records the results budget holds (about 40) and a few index keys.
    assert r.dbsize() < 100, r.dbsize()


def test_the_same_idempotency_key_is_the_same_job(private_redis: RedisServer) -> None:
    """A client that never got its answer resubmits with the same Idempotency-Key: one job."""
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis)
        first = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="line-7:part-991")
        again = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="line-7:part-991")
        other = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="line-7:part-992")
        await queue.conn.aclose()
        assert first.id == again.id != other.id
        assert len(r.xrange(f"{PREFIX}jobs:brick")) == 2

    asyncio.run(scenario())


def test_the_same_key_with_another_request_is_refused_not_answered_with_the_old_job(
        private_redis: RedisServer) -> None:
    """The key sent again with other images, names or options: the old job's result would
    answer another request (the API says 409 idempotency_key_reused); the same request sent
    again gets the job as stored, finished or not."""
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis)
        first = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="part-7")
        await queue.records.write(first.model_copy(update={"status": "done"}))
        again = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="part-7")
        assert again.id == first.id and again.status == "done"  # the stored record, not a fresh "queued" one
        for uploads, options in (
                ([Upload(filename="a.png", data=b"\x89PNG" + b"y" * 1000)], InspectOptions()),  # other bytes
                ([Upload(filename="b.png", data=UPLOADS[0].data)], InspectOptions()),  # another name
                (UPLOADS, InspectOptions(overlay=True)),  # other options
                (UPLOADS * 2, InspectOptions())):  # one more image
            with pytest.raises(IdempotencyConflict, match="another request") as info:
                await queue.submit("brick", uploads, options, None, idempotency_key="part-7")
            assert info.value.job_id == first.id
        await queue.conn.aclose()
        assert len(r.xrange(f"{PREFIX}jobs:brick")) == 1  # nothing queued by the refusals

    asyncio.run(scenario())


def test_a_key_whose_record_cannot_be_read_is_refused_not_answered_queued(private_redis: RedisServer) -> None:
    """The key's stored record does not validate (written by another version, or damaged):
    its request cannot be compared. Before, the resubmission (or another request with the
    key) was answered with a fresh "queued" record that was never stored or queued, while
    GET /v1/jobs/<id> said 500 job_record_unreadable."""
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis)
        first = await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="part-8")
        r.set(f"{PREFIX}job:{first.id}", b'{"status": "paused"}', keepttl=True)
        for uploads in (UPLOADS, [Upload(filename="b.png", data=UPLOADS[0].data)]):
            with pytest.raises(IdempotentJobUnreadable, match="cannot be read") as info:
                await queue.submit("brick", uploads, InspectOptions(), None, idempotency_key="part-8")
            assert info.value.job_id == first.id
        await queue.conn.aclose()
        assert len(r.xrange(f"{PREFIX}jobs:brick")) == 1

    asyncio.run(scenario())


def test_a_key_resubmitted_after_its_job_expired_is_charged_once(private_redis: RedisServer) -> None:
    """A submission sweeps a hundred expired charges; a key resubmitted beyond those used to
    overwrite its old charge without taking it off the total, leaking it for good."""
    size = len(UPLOADS[0].data)
    r = private_redis.client()

    async def scenario() -> None:
        queue = _queue(private_redis, job_ttl_s=0.3)
        for i in range(100):
            await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key=f"k{i}")
        await asyncio.sleep(0.01)  # the last job expires after those: beyond one sweep of a hundred
        await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="k100")
        await asyncio.sleep(0.4)
        await queue.submit("brick", UPLOADS, InspectOptions(), None, idempotency_key="k100")
        sizes = {k.decode(): int(v) for k, v in r.hgetall(f"{PREFIX}jobs-inputs:brick:bytes").items()}
        assert sizes.pop("#total") == sum(sizes.values()) == size  # swept 100, the resubmission's own
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_a_dead_workers_job_is_claimed_behind_many_live_ones(private_redis: RedisServer) -> None:
    """XAUTOCLAIM scans ten pending entries per one asked for: started from the beginning each
    time, ten jobs in live workers' hands hid a dead worker's job behind them until they were
    done (up to the worker's 600 s job deadline)."""
    async def scenario() -> None:
        queue = _queue(private_redis, job_claim_idle_s=0.2)
        await queue.ensure_groups(["brick"])
        for _ in range(25):
            await queue.submit("brick", UPLOADS, InspectOptions(), None)
        live = await queue.read(["brick"], "live", 24, 0.5)  # the oldest 24, worked on
        dead = await queue.read(["brick"], "dead", 1, 0.5)  # the newest: its worker was killed
        claimed: list[str] = []
        for _ in range(10):  # a claim each 0.1 s, as an idle worker's; 0.3 s past the claim idle time
            await asyncio.sleep(0.1)
            await queue.keep_alive("brick", "live", [d.stream_id for d in live])
            if claimed := [d.job_id for d in await queue.claim("brick", "rescuer", 1)]:
                break
        assert claimed == [dead[0].job_id]
        await queue.conn.aclose()

    asyncio.run(scenario())


def test_a_20_mib_submission_rides_out_a_stall_without_tripping_the_hot_path(private_redis: RedisServer,
                                                                            tmp_path: Path) -> None:
    """The API's job submissions carry the images: their connection's timeout is sized for
    max_request_bytes, not the 0.25 s of the hot path, and has no breaker. A 20 MiB job
    submitted while Redis stalls for 0.6 s goes in whole, once, and the cache/link
    connection never sees the failure (its breaker would skip Redis for everyone)."""
    from service.pipeline.state import ServiceState

    (tmp_path / "store").mkdir()
    settings = Settings(model_store=tmp_path / "store", redis_url=private_redis.url, redis_prefix=PREFIX,
                        redis_socket_timeout_s=0.25, redis_retries=0, max_request_bytes=24 * 1024 * 1024,
                        max_upload_bytes=24 * 1024 * 1024, store_poll_s=1.0)
    payload = [Upload(filename="big.png", data=b"\x89PNG" + bytes(20 * 1024 * 1024))]

    async def main() -> None:
        state = ServiceState(settings)
        try:
            stall = _Stall(private_redis, 0.6)
            record = await state.require_jobs().submit("brick", payload, InspectOptions(), request_id=None)
            stall.join()
            assert not state.redis.skipping  # the hot path's breaker never tripped
            client = private_redis.client()
            assert client.xlen(state.require_jobs().stream("brick")) == 1
            stored = await state.require_jobs().records.get(record.id)
            assert stored is not None and stored.filenames == ["big.png"]
        finally:
            await state.stop()

    asyncio.run(main())


def test_a_large_request_is_told_apart_by_its_digest_too(private_redis: RedisServer) -> None:
    """Over 1 MiB of images the digest is computed in a thread: the same answers."""
    big = [Upload(filename="big.png", data=b"\x89PNG" + b"z" * (2 << 20))]
    other = [Upload(filename="big.png", data=b"\x89PNG" + b"z" * (2 << 20) + b"!")]

    async def scenario() -> None:
        queue = _queue(private_redis, job_max_backlog_bytes=64 << 20)
        first = await queue.submit("brick", big, InspectOptions(), None, idempotency_key="big-part")
        assert (await queue.submit("brick", big, InspectOptions(), None, idempotency_key="big-part")).id == first.id
        with pytest.raises(IdempotencyConflict):
            await queue.submit("brick", other, InspectOptions(), None, idempotency_key="big-part")
        await queue.conn.aclose()

    asyncio.run(scenario())
