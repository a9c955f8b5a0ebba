"""The worker's loop (:class:`Worker`): claim or read jobs from the category streams, run
them through the pipeline runtime (each a :class:`service.worker.job.JobInHand`), record each
outcome (the package's docstring tells the whole flow)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.registry_errors import ModelNotLoaded, UnknownCategory
from service.pipeline.runtime import Lane, PipelineRuntime
from service.redisq.connection import RedisConnection, RedisUnavailable, make_client
from service.redisq.jobs import Delivery, JobQueue
from service.redisq.probe import probe_forever
from service.redisq.records import FINAL_STATES, FinalWrite, JobRecord, RecordTooLarge, Unreadable
from service.redisq.store import utcnow
from service.schemas import ErrorBody
from service.worker.categories import ConsumedCategories
from service.worker.claim_holdoff import claim_hold_off_s, keep_alive_every_s, socket_timeout_s
from service.worker.failures import JobFailed
from service.worker.inputs import InputBudget
from service.worker.job import JobInHand, run_job

log = logging.getLogger("service.worker")

# Reruns in hand of a job whose outputs (heatmap links) Redis could not store, each once Redis
# answers again, before the attempt is charged: a Redis restart is not the job's fault, but a
# Redis that answers and still refuses them must not rerun it forever.
OUTPUT_RERUNS = 3


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ServiceMetrics()
        client = make_client(settings, socket_timeout=socket_timeout_s(settings))  # no breaker: a worker waits
        self.conn = RedisConnection(settings, self.metrics, client=client, breaker_s=0.0)
        self.runtime = PipelineRuntime(settings, self.conn, metrics=self.metrics, memory_links=False)
        self.queue = JobQueue(settings, self.conn)
        self.metrics.worker_input_bytes.labels("budget").set(settings.worker_max_input_bytes)
        self.inputs = InputBudget(settings.worker_max_input_bytes,  # all categories' jobs together
                                  observe=self.metrics.worker_input_bytes.labels("held").set)
        self.stop = asyncio.Event()
        self.following = ConsumedCategories(self.name, self.queue, self.runtime.registry)
        # Set by any failed Redis call. Once Redis answers again no claim is made for
        # claim_hold_off_s: every holder's keep-alive failed during the outage too, so its live
        # jobs looked idle until its next one (claimed, they ran twice, each claim charged as a
        # delivery). A worker that starts holds off as long (:meth:`run`), for an outage it may
        # not have seen. Why that long and no longer: service/worker/claim_holdoff.py.
        self.claim_hold_off_s = claim_hold_off_s(settings)
        self.redis_failed = False
        self._tasks: list[asyncio.Task[None]] = []  # the store watch, consumer pruning, the Redis probe
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def categories(self) -> list[str]:
        """The categories consumed now (read, claimed from, beaten for)."""
        return self.following.consumed

    # ------------------------------------------------------------------ start-up and main loop
    async def start(self) -> None:
        """Load every category of the store (before consuming: a job must not wait for a
        model load), join the consumer groups, and watch the store for new versions (the
        runtime swaps lanes as the API does, so jobs follow the version the API serves)."""
        self.runtime.open()
        await self.runtime.registry.load_all()
        if not self.following.start():
            raise RuntimeError(f"no model could be loaded from {self.settings.model_store}: "
                               f"{self.runtime.registry.failed}")
        await self._until_redis(lambda: self.queue.ensure_groups(self.categories))
        self._tasks.append(asyncio.create_task(self.runtime.watch_store(), name="watch-store"))
        # Before the first read: a job's answer says from now on that a worker consumes it.
        await self._until_redis(lambda: self.queue.workers.beat(self.name, self.categories))
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")
        # Dead workers' consumers (host-pid names, one per restart) leave the groups: a bound.
        self._tasks.append(asyncio.create_task(self.queue.consumers.forever(
            lambda: [self.queue.stream(c) for c in self.categories], self.name, self._failed), name="prune-consumers"))
        # msflow_redis_up on MSFLOW_WORKER_METRICS_PORT; its failures do not hold claims off (probe.py says why).
        self._tasks.append(asyncio.create_task(probe_forever(self.conn, self.metrics.set_redis_up), name="redis-probe"))
        log.info("worker %s: consuming %s", self.name, ", ".join(self.categories))

    async def run(self) -> None:
        await self.start()
        claim_every = max(0.2, self.settings.job_claim_idle_s / 2)
        # No claim until Redis has answered this worker for the hold-off (start() just had its
        # answer): an outage that ended just before this start made live holders' jobs look
        # idle (their keep-alives, and heartbeats, lapsed in it) until their next keep-alive.
        # Only silence while Redis answers tells a dead holder from a cut-off one, and this
        # worker knows Redis answered only since it asked. Dead workers' jobs wait at most
        # min(how long no worker ran, the hold-off) longer (docs/DESIGN.md: why not heartbeats).
        next_claim = time.monotonic() + self.claim_hold_off_s
        while not self.stop.is_set():
            try:
                await self.following.follow()
                deliveries: list[Delivery] = []
                if time.monotonic() >= next_claim and not self.redis_failed:
                    # One re-delivered job at a time, alone: a job that kills its worker then costs
                    # only itself another delivery (and is dead-lettered alone once over the
                    # limit), never the innocent jobs it happened to be read with.
                    deliveries = await self._claim_one()
                    next_claim = 0.0 if deliveries else time.monotonic() + claim_every
                if not deliveries:
                    deliveries = await self.following.read(self.settings.max_batch_size, self.settings.worker_block_s)
                    if self.redis_failed:  # Redis is back: the holders refresh their claims first
                        self.redis_failed, next_claim = False, time.monotonic() + self.claim_hold_off_s
                await self.step(deliveries)
            except RedisUnavailable as exc:
                self.redis_failed = True
                if "NOGROUP" in str(exc.__cause__ or ""):  # the stream went away (Redis restarted empty)
                    self.following.streams_gone()
                    await self._until_redis(lambda: self.queue.ensure_groups(self.categories))
                    continue
                log.warning("worker %s: Redis unavailable (%s); retrying in 1 s", self.name, exc)
                await self._sleep(1.0)

    async def _claim_one(self) -> list[Delivery]:
        """The oldest job of any category left pending past ``job_claim_idle_s`` (its worker
        died, or its attempt failed), claimed on its own."""
        for category in self.categories:
            claimed = await self.queue.claim(category, self.name, 1)
            if claimed:
                return claimed
        return []

    async def step(self, deliveries: list[Delivery]) -> None:
        """Run what one read (or claim) delivered: categories in parallel, each on its own lane;
        every delivered job's claim is kept alive from now until its outcome is recorded."""
        by_category: dict[str, list[Delivery]] = {}
        for d in deliveries:
            by_category.setdefault(d.message.category, []).append(d)
        held = {category: {d.stream_id for d in group} for category, group in by_category.items()}
        keep_alive = asyncio.create_task(self._keep_alive(held)) if held else None
        try:
            outcomes = await asyncio.gather(*(self.process(c, group, held[c]) for c, group in by_category.items()),
                                            return_exceptions=True)
        finally:
            if keep_alive is not None:
                keep_alive.cancel()
        for (category, group), outcome in zip(by_category.items(), outcomes):
            if isinstance(outcome, RedisUnavailable):
                raise outcome
            if isinstance(outcome, BaseException):  # a bug: the jobs stay pending, are retried, then dead-lettered
                log.error("worker %s: processing %d %s job(s) failed", self.name, len(group), category,
                          exc_info=outcome)

    async def _until_redis(self, fn: Callable[[], Awaitable[None]]) -> None:
        while not self.stop.is_set():
            try:
                await fn()
                return
            except RedisUnavailable as exc:
                self.redis_failed = True
                log.warning("worker %s: waiting for Redis (%s)", self.name, exc)
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ the jobs of one category
    async def process(self, category: str, deliveries: list[Delivery], held: set[str] | None = None) -> None:
        """The jobs of one category: take the deliveries, run them, record each outcome.
        ``held``: the stream ids :meth:`step` keeps alive; each leaves it once its outcome is
        recorded (a job waiting for room for its inputs stays in it: in hand, kept alive)."""
        jobs = await self._take(category, deliveries)
        if not jobs:
            return
        with ExitStack() as pinned:
            try:
                lane = pinned.enter_context(self.runtime.pin(category))  # one version for all these jobs
            except (ModelNotLoaded, UnknownCategory) as exc:
                # Unknown here: consumed once, so the store watch retired it (its folder left the
                # store); another attempt would fail alike. Not loaded (yet): retried.
                unknown = isinstance(exc, UnknownCategory)
                for job in jobs:
                    job.error = JobFailed("unknown_category" if unknown else "model_not_loaded", str(exc),
                                          permanent=unknown)
                    await self._finish(category, job, held)
                return
            await self._run_jobs(category, lane, jobs, held)

    async def _take(self, category: str, deliveries: list[Delivery]) -> list[JobInHand]:
        """The deliveries to run, with their records and input sizes (not their images yet);
        the others are acknowledged or dead-lettered here."""
        peeked = await self.queue.records.peek(category, [d.job_id for d in deliveries])
        jobs: list[JobInHand] = []
        for delivery, (record, size) in zip(deliveries, peeked):
            if isinstance(record, Unreadable):  # would fail the same way on every delivery
                # Written over with a failed record this version reads: its GET then says why,
                # and its images and their charge on the backlog's bytes go now, not in a day.
                now = utcnow()
                readable = JobRecord(id=delivery.job_id, category=category, status="queued", created_at=now,
                                     updated_at=now, filenames=[])
                self._count(category, "dead_lettered", await self.queue.dead_letter(
                    delivery, readable, ErrorBody(code="invalid_record", message=record.reason), self.name))
            elif record is None or record.status in FINAL_STATES:
                # Expired, or finished by a worker that died before its XACK: nothing to redo.
                self.metrics.jobs.labels(category, "expired" if record is None else "duplicate").inc()
                await self.queue.ack(delivery)
            elif delivery.deliveries > self.settings.job_max_attempts:
                # Delivered too often without a recorded outcome: it kills (or hangs) its workers.
                # This delivery only buries it: the runs were the ones before.
                runs = delivery.deliveries - 1
                error = record.error or ErrorBody(code="worker_lost", message=(
                    f"the job ran {runs} times (MSFLOW_JOB_MAX_ATTEMPTS is {self.settings.job_max_attempts}) and no "
                    "worker finished it: each run ended without an outcome, its worker killed (out of memory, "
                    "say) or stalled"))
                self._count(category, "dead_lettered", await self.queue.dead_letter(delivery, record, error, self.name,
                                                                                   attempts=runs))
            else:
                # A size the queue does not know counts as the whole budget: the job is fetched alone.
                jobs.append(JobInHand(delivery, record.model_copy(update={
                    "status": "running", "attempts": delivery.deliveries, "worker": self.name}),
                    self.inputs.limit if size is None else size))
        return jobs

    async def _run_jobs(self, category: str, lane: Lane, jobs: list[JobInHand], held: set[str] | None) -> None:
        """Fetch the jobs' images as the input budget gives room, in order: those that fit
        together are fetched in one round trip and run at once (their images share engine
        batches); the others wait in hand until earlier ones are done with theirs."""
        waiting, running = list(jobs), []
        try:
            while waiting:
                taken = await self.inputs.take([job.size for job in waiting])
                group, waiting = waiting[:taken], waiting[taken:]
                for job in group:
                    job.holding = True
                running.append(asyncio.create_task(self._fetch_and_run(category, lane, group, held)))
                if any(task.done() and not task.cancelled() and task.exception() for task in running):
                    break  # Redis failed: the rest stay pending, redelivered like the failed ones
        finally:
            outcomes = await asyncio.gather(*running, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _fetch_and_run(self, category: str, lane: Lane, group: list[JobInHand], held: set[str] | None) -> None:
        """Fetch the group, run each job and record its outcome; each job's images are dropped
        (and their room given back) as soon as it has run."""
        try:
            async def run_one(job: JobInHand) -> None:
                try:
                    await self._run_job(lane, job)
                    for _ in range(OUTPUT_RERUNS):  # Redis's fault, not the job's: no attempt charged
                        if job.error is None or not job.error.outputs_unstored or not await self._redis_back(job):
                            break
                        await self._run_job(lane, job)
                finally:
                    self._drop_inputs(job)
                await self._finish(category, job, held)

            await asyncio.gather(*(run_one(job) for job in await self._fetch(category, group, held)))
        finally:
            for job in group:  # Redis failed before these ran: they stay pending
                self._drop_inputs(job)

    async def _fetch(self, category: str, group: list[JobInHand], held: set[str] | None = None) -> list[JobInHand]:
        """Mark the jobs running and fetch their images in one round trip; the jobs to run (one
        that went final meanwhile is acknowledged instead)."""
        jobs = []
        for job in group:
            job.record = job.record.model_copy(update={"updated_at": utcnow()})
            if await self.queue.records.write(job.record):
                jobs.append(job)
            else:
                await self.queue.ack(job.delivery)
                self._drop_inputs(job)
                if held is not None:
                    held.discard(job.delivery.stream_id)
        if not jobs:
            return []
        for job, data in zip(jobs, await self.queue.records.images([job.record.id for job in jobs])):
            job.data, job.started = data, time.monotonic()
            actual = sum(len(image) for image in data)
            if job.holding:
                self.inputs.adjust(job.size, actual)
            job.size = actual
        log.debug("worker %s: %d %s job(s) fetched; %d input bytes held of %d", self.name, len(jobs), category,
                  self.inputs.held, self.inputs.limit)
        return jobs

    def _drop_inputs(self, job: JobInHand) -> None:
        """The job's images leave memory, and their room the input budget (once)."""
        job.data = []
        for item in job.items:
            item.data = b""
        if job.holding:
            job.holding = False
            self.inputs.give(job.size)

    async def _redis_back(self, job: JobInHand) -> bool:
        """After a second, wait until Redis answers again (a restart, a failover): the job whose
        outputs it could not store then runs again in hand. Left to a redelivery, each restart
        during its runs spent an attempt, and job_max_attempts restarts dead-lettered a good
        job. False once the worker stops (the attempt is then recorded as failed)."""
        log.warning("job %s: Redis could not store its outputs; it runs again once Redis answers", job.record.id)

        async def ping() -> None:
            await self.conn.run("ping", lambda r: r.ping())

        await self._sleep(1.0)
        await self._until_redis(ping)
        return not self.stop.is_set()

    async def _run_job(self, lane: Lane, job: JobInHand) -> None:
        await run_job(self.runtime, lane, job)

    async def _finish(self, category: str, job: JobInHand, held: set[str] | None = None) -> None:
        """Record the job's outcome (its stream id then leaves ``held``). While Redis is
        unavailable the write is retried every second: the result is computed, and a restart
        or failover of Redis must not cost a rerun (nor, repeated, the job's attempts). Once
        the worker stops, one last try; then the job stays pending and is redelivered."""
        try:
            while True:
                try:
                    await self._record_outcome(category, job)
                    return
                except RedisUnavailable as exc:
                    self.redis_failed = True
                    if self.stop.is_set():
                        log.warning("job %s: cannot record its outcome (%s); it will be redelivered", job.record.id,
                                    exc)
                        return
                    log.warning("job %s: cannot record its outcome yet (%s); retrying in 1 s", job.record.id, exc)
                    await self._sleep(1.0)
        finally:
            if held is not None:
                held.discard(job.delivery.stream_id)

    async def _record_outcome(self, category: str, job: JobInHand) -> None:
        """Final record + XACK, or a recorded failed attempt (retried later, or dead-lettered)."""
        if job.error is None:
            try:
                self._count(category, "done", await self.queue.complete(job.delivery, job.record))
                return
            except RecordTooLarge as exc:  # would evict every other finished record
                job.error = JobFailed("result_too_large", str(exc), permanent=True)
        if job.error.permanent or job.delivery.deliveries >= self.settings.job_max_attempts:
            self._count(category, "dead_lettered",
                        await self.queue.dead_letter(job.delivery, job.record, job.error.error, self.name))
        else:
            log.warning("job %s attempt %d failed: %s: %s (retried after %.1f s)", job.record.id,
                        job.delivery.deliveries, job.error.error.code, job.error.error.message,
                        self.settings.job_claim_idle_s)
            # Left pending: XAUTOCLAIM hands it out again once idle past job_claim_idle_s.
            await self.queue.records.write(job.record.model_copy(update={
                "status": "queued", "error": job.error.error, "updated_at": utcnow()}))
            self.metrics.jobs.labels(category, "retried").inc()

    def _count(self, category: str, outcome: str, write: FinalWrite) -> None:
        """A final write's outcome, or "duplicate" when the job was final already (finished by
        a worker it was claimed from, say): each job counts once."""
        self.metrics.jobs.labels(category, outcome if write.written else "duplicate").inc()
        self.metrics.redis_evictions.labels("job_results").inc(write.evicted)

    async def _keep_alive(self, held: dict[str, set[str]]) -> None:
        """Keep our claim on every job in hand fresh (all categories, whether running or still
        waiting for room), so that only a dead (or stopped) worker's jobs are taken over."""
        every = keep_alive_every_s(self.settings)  # the hold-off after a failure counts on it
        while True:
            await asyncio.sleep(every)
            for category, stream_ids in held.items():
                try:
                    await self.queue.keep_alive(category, self.name, sorted(stream_ids))
                except RedisUnavailable:
                    self.redis_failed = True

    async def _beat(self) -> None:
        """Say every few seconds which categories this worker consumes (a job's answer counts
        the workers alive); a beat Redis misses is sent again with the next."""
        while True:
            await asyncio.sleep(self.queue.workers.every_s)
            try:
                await self.queue.workers.beat(self.name, self.categories)
            except RedisUnavailable:
                self.redis_failed = True

    def _failed(self) -> None:
        self.redis_failed = True

    async def close(self) -> None:
        """Finish what the batchers hold, release threads and the connection."""
        for task in self._tasks:
            task.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:  # a clean stop leaves at once, rather than counting as alive until its beat runs out
                await self.queue.workers.leave(self.name, self.categories)
            except RedisUnavailable:
                pass
        await self.runtime.close()


__all__ = ["OUTPUT_RERUNS", "Worker"]
