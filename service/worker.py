"""``msflow worker``: run async inspection jobs from the Redis streams, on this host or any other.

A worker is a peer of the API on the same pipeline: it owns a
:class:`~service.pipeline.runtime.PipelineRuntime` (the registry, lanes and batchers, thread
pool, heatmap links and threshold overrides the API's ``ServiceState`` is built on), joins the
consumer group of each category's stream (:mod:`service.redisq.jobs`) and loops:

1. claim a job left pending by a dead worker or a failed attempt (XAUTOCLAIM), *one at a
   time*, and run it alone: a job that kills its worker takes only itself down, and once
   delivered more than ``job_max_attempts`` times it is dead-lettered alone;
2. otherwise read new jobs (XREADGROUP, up to ``max_batch_size`` per category, blocking
   ``worker_block_s``);
3. per category (categories in parallel): pin the category's lane once for the jobs read,
   and run every job through the runtime's inspect path at the same time
   (:meth:`~service.pipeline.runtime.PipelineRuntime.run`: header probe and admission under
   the worker's own pixel budget, where a job waits for room instead of being refused;
   decode, the lane's batcher, postprocess), so the images of concurrent jobs share engine
   batches and every result has exactly the shape and numbers of a synchronous answer. A
   job over the per-request pixel budget fails for good (``too_many_pixels``). Every job
   in hand, of every category, has its claim kept alive until its outcome is recorded. Then each job's final record
   and XACK go in one MULTI. A failed attempt stays pending and is retried after the idle
   timeout; the last allowed attempt sends the job to the dead-letter stream.

Failures stay with their job: a bad image fails its own job only; an engine error fails the
jobs whose images were in that batch (retried); heatmap links that cannot reach Redis fail
the attempt (the worker serves no HTTP, so a link only in its memory would be dead).

SIGTERM/SIGINT: stop reading, finish the jobs in hand, exit. A SIGKILLed (or stopped)
worker's jobs are claimed by the others once their keep-alive stops. Metrics:
``MSFLOW_WORKER_METRICS_PORT`` (Prometheus).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.allocator import keep_freed_memory
from service.config import Settings, warn_unknown_env
from service.heap import freeze_startup_objects
from service.metrics import ServiceMetrics
from service.pipeline.admission import AdmissionRefused, RequestTooExpensive
from service.pipeline.batcher import BatcherClosed, BatcherError, DeadlineExceeded, QueueFull
from service.pipeline.decode import ImageRejected
from service.pipeline.item import InspectedImage
from service.pipeline.registry import ModelNotLoaded, UnknownCategory
from service.pipeline.runtime import Lane, NonFiniteOutput, PipelineRuntime
from service.redisq.connection import RedisConnection, RedisUnavailable, make_client
from service.redisq.jobs import Delivery, JobQueue
from service.redisq.records import FINAL_STATES, FinalWrite, JobRecord, RecordTooLarge, Unreadable
from service.redisq.store import utcnow
from service.schemas import ErrorBody, InspectResponse, Upload

log = logging.getLogger(__name__)

# A job's images must reach the engine within this, or the attempt fails and is retried: a
# wedged engine must not hold jobs forever (their claim is kept alive meanwhile, so nobody
# else would take them). Far above any queueing a healthy worker sees.
JOB_DEADLINE_S = 600.0
# Errors of the batcher stage -> the job's error code.
_BATCHER_CODES: dict[type[BatcherError], str] = {
    QueueFull: "queue_full", BatcherClosed: "shutting_down", DeadlineExceeded: "deadline_exceeded"}
# An unexpected error, by the least advanced image of the job (InspectedImage.stage): which
# stage failed. An engine failure (the batch's, already logged by the batcher) is "decoded".
_STAGES = ("received", "decoded", "scored", "answered")
_STAGE_CODES: dict[str, str] = {"received": "decode_error", "decoded": "engine_error", "scored": "postprocess_error"}
_PUBLIC_FAILURES: dict[str, str] = {"decode_error": "decoding the job's images failed",
                                    "engine_error": "the engine failed on this job's batch",
                                    "postprocess_error": "rendering the job's results failed"}


class JobFailed(Exception):
    """One job's attempt failed (bad input, engine error): recorded, retried or dead-lettered.
    ``permanent``: another attempt would fail the same way (the input itself is bad), so the
    job is dead-lettered at once instead of costing more attempts."""

    def __init__(self, code: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.error = ErrorBody(code=code, message=message)
        self.permanent = permanent


@dataclass
class _Job:
    delivery: Delivery
    record: JobRecord
    data: list[bytes]
    started: float = field(default_factory=time.monotonic)
    items: list[InspectedImage] = field(default_factory=list)  # one record per image, filled by the pipeline
    error: JobFailed | None = None


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ServiceMetrics()
        # XREADGROUP BLOCK must finish inside the socket timeout, and so must reading a job's
        # images (up to max_request_bytes, at 50 MB/s from a loaded Redis host, as the API's
        # submissions are sized); no breaker: a worker has no request to protect, it waits.
        client = make_client(settings, socket_timeout=settings.worker_block_s + max(1.0, settings.redis_socket_timeout_s)
                             + settings.max_request_bytes / 50e6)
        self.conn = RedisConnection(settings, self.metrics, client=client, breaker_s=0.0)
        self.runtime = PipelineRuntime(settings, self.conn, metrics=self.metrics, memory_links=False)
        self.queue = JobQueue(settings, self.conn)
        self.stop = asyncio.Event()
        self.categories: list[str] = []
        self._watch: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ start-up and main loop
    async def start(self) -> None:
        """Load every category of the store (before consuming: a job must not wait for a
        model load), join the consumer groups, and watch the store for new versions (the
        runtime swaps lanes as the API does, so jobs follow the version the API serves)."""
        self.runtime.open()
        await self.runtime.registry.load_all()
        self.categories = sorted(self.runtime.registry.serving())
        if not self.categories:
            raise RuntimeError(f"no model could be loaded from {self.settings.model_store}: "
                               f"{self.runtime.registry.failed}")
        await self._until_redis(lambda: self.queue.ensure_groups(self.categories))
        self._watch = asyncio.create_task(self.runtime.watch_store(), name="watch-store")
        log.info("worker %s: consuming %s", self.name, ", ".join(self.categories))

    async def run(self) -> None:
        await self.start()
        claim_every = max(0.2, self.settings.job_claim_idle_s / 2)
        next_claim = 0.0
        while not self.stop.is_set():
            try:
                await self._follow_store()
                deliveries: list[Delivery] = []
                if time.monotonic() >= next_claim:
                    # One re-delivered job at a time, alone: a job that kills its worker then costs
                    # only itself another delivery (and is dead-lettered alone once over the
                    # limit), never the innocent jobs it happened to be read with.
                    deliveries = await self._claim_one()
                    next_claim = 0.0 if deliveries else time.monotonic() + claim_every
                if not deliveries:
                    deliveries = await self.queue.read(self.categories, self.name, self.settings.max_batch_size,
                                                       self.settings.worker_block_s)
                await self.step(deliveries)
            except RedisUnavailable as exc:
                if "NOGROUP" in str(exc.__cause__ or ""):  # the stream went away (Redis restarted empty)
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

    async def _follow_store(self) -> None:
        """Consume the categories that appeared in the store since the last look too."""
        new = sorted(set(self.runtime.registry.serving()) - set(self.categories))
        if new:
            await self.queue.ensure_groups(new)
            self.categories = sorted([*self.categories, *new])
            log.info("worker %s: now consuming %s too", self.name, ", ".join(new))

    async def _until_redis(self, fn: Callable[[], Awaitable[None]]) -> None:
        while not self.stop.is_set():
            try:
                await fn()
                return
            except RedisUnavailable as exc:
                log.warning("worker %s: waiting for Redis (%s)", self.name, exc)
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ the jobs of one category
    async def process(self, category: str, deliveries: list[Delivery], held: set[str] | None = None) -> None:
        """The jobs of one category: take the deliveries (mark them running), run them, record
        each outcome. ``held``: the stream ids :meth:`step` keeps alive; each leaves it once
        its outcome is recorded."""
        jobs = await self._take(category, deliveries)
        if jobs:
            await self._run_jobs(category, jobs)
        for job in jobs:
            await self._finish(category, job)
            if held is not None:
                held.discard(job.delivery.stream_id)

    async def _take(self, category: str, deliveries: list[Delivery]) -> list[_Job]:
        loaded = await self.queue.records.load([d.job_id for d in deliveries])
        jobs: list[_Job] = []
        for delivery, (record, data) in zip(deliveries, loaded):
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
                error = record.error or ErrorBody(code="worker_lost", message=(
                    f"the job was delivered {delivery.deliveries} times and no worker finished it"))
                self._count(category, "dead_lettered", await self.queue.dead_letter(delivery, record, error, self.name))
            else:
                record = record.model_copy(update={"status": "running", "attempts": delivery.deliveries,
                                                   "worker": self.name, "updated_at": utcnow()})
                if await self.queue.records.write(record):
                    jobs.append(_Job(delivery, record, data))
                else:  # went final meanwhile
                    await self.queue.ack(delivery)
        return jobs

    async def _run_jobs(self, category: str, jobs: list[_Job]) -> None:
        try:
            with self.runtime.pin(category) as lane:  # one version for all these jobs
                await asyncio.gather(*(self._run_job(lane, job) for job in jobs))
        except (ModelNotLoaded, UnknownCategory) as exc:  # only pin raises these; _run_job keeps its errors
            for job in jobs:
                job.error = JobFailed("model_not_loaded", str(exc))

    async def _run_job(self, lane: Lane, job: _Job) -> None:
        """The runtime's inspect path for one job; its failure stays in ``job.error``."""
        record = job.record
        if not job.data or len(job.data) != len(record.filenames):
            job.error = JobFailed("inputs_missing", "the job's images are gone (expired or never stored)",
                                  permanent=True)
            return
        # Time in the stream counts as queueing, like the batcher's: both are waits before the engine.
        waited_ms = max(0.0, (utcnow() - _aware(record.created_at)).total_seconds() * 1e3)
        job.items = [InspectedImage.received(i, Upload(filename=name, data=data), queue_ms=waited_ms)
                     for i, (name, data) in enumerate(zip(record.filenames, job.data))]
        try:
            await self.runtime.run(lane, job.items, record.options, job.started + JOB_DEADLINE_S, job.started,
                                   wait_for_room=True)
        except (ImageRejected, RequestTooExpensive) as exc:  # the bytes will not get cheaper next time
            job.error = JobFailed(exc.code, exc.message, permanent=True)
        except NonFiniteOutput as exc:  # never a verdict: the job fails with the reason
            job.error = JobFailed(exc.code, str(exc), permanent=True)
        except RedisUnavailable as exc:
            log.warning("job %s: cannot store its heatmap links: %s", record.id, exc)
            job.error = JobFailed("redis_unavailable", "cannot store the heatmap links: Redis is unavailable")
        except BatcherError as exc:
            job.error = JobFailed(_BATCHER_CODES.get(type(exc), "engine_error"), str(exc))
        except AdmissionRefused as exc:  # no room in the pixel budget before the job's deadline: retried
            job.error = JobFailed(exc.code, exc.message)
        except Exception as exc:  # the engine's batch failed, or a bug
            stage = min((item.stage for item in job.items), key=_STAGES.index)
            if stage != "decoded":
                log.exception("job %s: failed after its images were %s", record.id, stage)
            else:
                log.warning("job %s: the engine failed on its batch: %s: %s", record.id, type(exc).__name__, exc)
            code = _STAGE_CODES.get(stage, "internal_error")
            # The exception's text is internal (engine runtime, paths): the log has it, the record a fixed message.
            job.error = JobFailed(code, f"{_PUBLIC_FAILURES.get(code, 'the job failed')} (job {record.id}; "
                                        "the worker's log has the details)")
        else:
            results = [item.answer for item in job.items]
            response = InspectResponse(request_id=record.request_id or record.id, category=lane.model.category,
                                       model_version=results[0].model_version, engine=lane.model.engine.name,
                                       results=results)
            job.record = record.model_copy(update={"status": "done", "result": response, "error": None,
                                                   "updated_at": utcnow()})


    async def _finish(self, category: str, job: _Job) -> None:
        """Record the job's outcome. While Redis is unavailable the write is retried every
        second: the result is computed, and a restart or failover of Redis must not cost a
        rerun (nor, repeated, the job's attempts). Once the worker stops, one last try; then
        the job stays pending and is redelivered."""
        while True:
            try:
                await self._record_outcome(category, job)
                return
            except RedisUnavailable as exc:
                if self.stop.is_set():
                    log.warning("job %s: cannot record its outcome (%s); it will be redelivered", job.record.id, exc)
                    return
                log.warning("job %s: cannot record its outcome yet (%s); retrying in 1 s", job.record.id, exc)
                await self._sleep(1.0)

    async def _record_outcome(self, category: str, job: _Job) -> None:
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
        every = max(0.1, self.settings.job_claim_idle_s / 3)
        while True:
            await asyncio.sleep(every)
            for category, stream_ids in held.items():
                try:
                    await self.queue.keep_alive(category, self.name, sorted(stream_ids))
                except RedisUnavailable:
                    pass

    async def close(self) -> None:
        """Finish what the batchers hold, release threads and the connection."""
        if self._watch is not None:
            self._watch.cancel()
        await self.runtime.close()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


# ---------------------------------------------------------------------- CLI
def run_worker(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if getattr(args, "store", None):
        overrides["model_store"] = args.store
    if getattr(args, "name", None):
        overrides["worker_name"] = args.name
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_unknown_env()
    if not settings.redis_url:
        log.error("msflow worker needs Redis: set MSFLOW_REDIS_URL")
        return 2
    keep_freed_memory(settings.heap_retain_mb << 20)
    freeze_startup_objects()
    return asyncio.run(_main(settings))


async def _main(settings: Settings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        # On MSFLOW_HOST, as the API: prometheus-client's default is every interface.
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=worker.metrics.registry)
    try:
        await worker.run()
    except Exception:
        log.exception("worker %s failed", worker.name)
        return 1
    finally:
        await worker.close()
    log.info("worker %s: stopped", worker.name)
    return 0
