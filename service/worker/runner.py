"""What a worker does with the jobs of one category that a read or a claim delivered
(:class:`JobRunner`): take them (those that cannot run are acknowledged or dead-lettered),
fetch their images as the input budget gives room, run them through the pipeline runtime,
and record each outcome. The loop that reads, claims and keeps claims alive is
:mod:`service.worker.consumer`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from typing import TypeVar

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.registry_errors import ModelNotLoaded, UnknownCategory
from service.pipeline.runtime import Lane, PipelineRuntime
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.redisq.jobs import Delivery, JobQueue
from service.redisq.records import FINAL_STATES, FinalWrite, JobRecord, RecordTooLarge, Unreadable
from service.redisq.store import utcnow
from service.schemas import ErrorBody
from service.worker.failures import JobFailed
from service.worker.inputs import InputBudget
from service.worker.job import JobInHand, run_job

log = logging.getLogger("service.worker")

_T = TypeVar("_T")

# Reruns in hand of a job whose outputs (heatmap links) Redis could not store, each once Redis
# answers again, before the attempt is charged: a Redis restart is not the job's fault, but a
# Redis that answers and still refuses them must not rerun it forever.
OUTPUT_RERUNS = 3


class JobRunner:
    """Delivered jobs, from their delivery to their recorded outcome: one category per call
    of :meth:`process` (the worker runs categories in parallel). ``stop``: the worker stopping
    (a wait for Redis ends, an outcome gets one last try); ``failed``: told of every Redis call
    that failed (the worker holds its claims off after one)."""

    def __init__(self, settings: Settings, name: str, *, queue: JobQueue, runtime: PipelineRuntime,
                 inputs: InputBudget, metrics: ServiceMetrics, conn: RedisConnection, stop: asyncio.Event,
                 failed: Callable[[], None]) -> None:
        self.settings = settings
        self.name = name
        self.queue = queue
        self.runtime = runtime
        self.inputs = inputs
        self.metrics = metrics
        self.conn = conn
        self.stop = stop
        self._failed = failed

    async def process(self, category: str, deliveries: list[Delivery], held: set[str] | None = None) -> None:
        """The jobs of one category: take the deliveries, run them, record each outcome.
        ``held``: the stream ids the worker keeps alive (``Worker.step``); each leaves it once
        its outcome is recorded (a job waiting for room for its inputs stays in it: in hand,
        kept alive)."""
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
                    break  # Redis failed (as the worker stopped): the rest stay pending, redelivered like those
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
            for job in group:  # the worker stopped while Redis refused their fetch: they stay pending
                self._drop_inputs(job)

    async def _fetch(self, category: str, group: list[JobInHand], held: set[str] | None = None) -> list[JobInHand]:
        """Mark the jobs running and fetch their images in one round trip; the jobs to run (one
        that went final meanwhile is acknowledged instead)."""
        jobs = []
        for job in group:
            job.record = job.record.model_copy(update={"updated_at": utcnow()})
            if await self._until_redis_takes(f"job {job.record.id}: marking it running",
                                             partial(self.queue.records.write, job.record)):
                jobs.append(job)
            else:
                await self.queue.ack(job.delivery)
                self._drop_inputs(job)
                if held is not None:
                    held.discard(job.delivery.stream_id)
        if not jobs:
            return []
        fetched = await self._until_redis_takes(f"{len(jobs)} {category} job(s): fetching their images",
                                                partial(self.queue.records.images, [job.record.id for job in jobs]))
        for job, data in zip(jobs, fetched):
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

    async def _until_redis_takes(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``await call()``, retried every second while Redis refuses it, until the worker stops
        (then the last failure is raised: the job stays pending and is redelivered). For the
        calls of a job in hand, kept alive meanwhile: given back to the stream instead, each
        claim of it charged a delivery, and a Redis that hands out jobs but refuses writes (a
        noeviction Redis past maxmemory: XREADGROUP and XAUTOCLAIM go on) dead-lettered jobs
        that never ran as worker_lost after a few claim periods."""
        while True:
            try:
                return await call()
            except RedisUnavailable as exc:
                self._failed()
                if self.stop.is_set():
                    raise
                log.warning("%s: Redis refused it (%s); retrying in 1 s", what, exc)
                await self._sleep(1.0)

    async def _redis_back(self, job: JobInHand) -> bool:
        """After a second, wait until Redis answers again (a restart, a failover): the job whose
        outputs it could not store then runs again in hand. Left to a redelivery, each restart
        during its runs spent an attempt, and job_max_attempts restarts dead-lettered a good
        job. False once the worker stops (the attempt is then recorded as failed)."""
        log.warning("job %s: Redis could not store its outputs; it runs again once Redis answers", job.record.id)

        await self._sleep(1.0)
        while not self.stop.is_set():
            try:
                await self.conn.run("ping", lambda r: r.ping())
                break
            except RedisUnavailable as exc:
                self._failed()
                log.warning("worker %s: waiting for Redis (%s)", self.name, exc)
                await self._sleep(1.0)
        return not self.stop.is_set()

    async def _run_job(self, lane: Lane, job: JobInHand) -> None:
        await run_job(self.runtime, lane, job)

    async def _finish(self, category: str, job: JobInHand, held: set[str] | None = None) -> None:
        """Record the job's outcome (its stream id then leaves ``held``). While Redis is
        unavailable the write is retried every second: the result is computed, and a restart
        or failover of Redis must not cost a rerun (nor, repeated, the job's attempts). Once
        the worker stops, one last try; then the job stays pending and is redelivered."""
        try:
            await self._until_redis_takes(f"job {job.record.id}: recording its outcome",
                                          partial(self._record_outcome, category, job))
        except RedisUnavailable as exc:
            log.warning("job %s: cannot record its outcome (%s); it will be redelivered", job.record.id, exc)
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

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(self.stop, seconds)


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile (the worker's waits all end at a stop).
    ``asyncio.timeout``, not ``wait_for``: Python 3.11's ``wait_for`` drops a cancellation that
    comes as ``stop`` is set, and the worker's loop, cancelled there, went on."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


__all__ = ["OUTPUT_RERUNS", "JobRunner", "sleep_unless_stopped"]
