"""``msflow worker``: run async inspection jobs from the Redis streams, on this host or any other.

Each worker loads the categories of its model store (the same registry and engines as the
API), joins the consumer group of each category's stream (:mod:`service.redisq.jobs`) and loops:

1. every ``job_claim_idle_s / 2``: claim jobs left pending by dead workers (XAUTOCLAIM);
2. otherwise read new jobs (XREADGROUP, up to ``max_batch_size`` per category, blocking
   ``worker_block_s``);
3. per category: decode every image of every job read, run the engine on batches of up to
   ``max_batch_size`` images, build the results exactly as the API does
   (:func:`service.pipeline.postprocess.build_results`), then write each job's final record and XACK
   in one MULTI. A failed attempt stays pending and is retried after the idle timeout; the
   last allowed attempt sends the job to the dead-letter stream.

SIGTERM/SIGINT: stop reading, finish the batch in hand, exit. A SIGKILLed worker's jobs are
claimed by the others. Metrics: ``MSFLOW_WORKER_METRICS_PORT`` (Prometheus).

Test hook: the setting ``worker_test_stall_on=<filename>`` (``MSFLOW_WORKER_TEST_STALL_ON``) makes a worker hang (while keeping its
claim alive) after taking a job with an image of that name on its first delivery, so a
test can kill it mid-job deterministically. Never set it in production.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from service.config import Settings, warn_unknown_env
from service.pipeline.decode import DecodedImage, ImageLimits, ImageRejected, configure_pillow, decode_image
from service.redisq.jobs import Delivery, JobQueue
from service.metrics import ServiceMetrics
from service.redisq.connection import RedisConnection, RedisUnavailable, make_client
from service.pipeline.registry import LoadedModel, ModelRegistry
from service.pipeline.postprocess import ItemResult, build_results, policy_from_settings
from service.pipeline.thresholds import ThresholdOverrides
from service.schemas import ErrorBody, InspectResponse
from service.redisq.store import FINAL_STATES, HeatmapLinks, JobRecord, utcnow

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """One job's attempt failed (bad input, engine error): recorded, retried or dead-lettered."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error = ErrorBody(code=code, message=message)


@dataclass
class _Job:
    delivery: Delivery
    record: JobRecord
    data: list[bytes]
    started: float = field(default_factory=time.monotonic)
    images: list[DecodedImage] = field(default_factory=list)
    scored: list[ItemResult | None] = field(default_factory=list)
    error: JobFailed | None = None
    model: LoadedModel | None = None  # the version the job is pinned to


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ServiceMetrics()
        self.registry = ModelRegistry(settings, on_swap=lambda m: self.metrics.set_model(
            m.category, m.version, m.engine.name))
        # XREADGROUP BLOCK must finish inside the socket timeout.
        client = make_client(settings, socket_timeout=settings.worker_block_s + max(1.0, settings.redis_socket_timeout_s))
        self.conn = RedisConnection(settings, self.metrics, client=client, breaker_s=0.0)
        self.queue = JobQueue(settings, self.conn)
        self.links = HeatmapLinks(settings, self.conn, memory=False, metrics=self.metrics)
        # The same effective thresholds as the API replicas (overrides live in Redis/the store).
        self.thresholds = ThresholdOverrides(settings, self.conn)
        self.policy = policy_from_settings(settings, self.thresholds.calibration)
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        self.stop = asyncio.Event()
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="worker")
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")  # one caller per engine
        self.categories: list[str] = []

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        configure_pillow(self.settings.max_image_pixels)
        self.registry.discover()
        await self.registry.load_all()
        self.thresholds.start(self.registry.serving)
        self.categories = sorted(self.registry.serving())
        if not self.categories:
            raise RuntimeError(f"no model could be loaded from {self.settings.model_store}: {self.registry.failed}")
        await self._until_redis(lambda: self.queue.ensure_groups(self.categories))
        log.info("worker %s: consuming %s", self.name, ", ".join(self.categories))
        claim_every = max(0.2, self.settings.job_claim_idle_s / 2)
        next_claim = 0.0
        count = self.settings.max_batch_size
        while not self.stop.is_set():
            try:
                deliveries: list[Delivery] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + claim_every
                    for category in self.categories:
                        deliveries += await self.queue.claim(category, self.name, count)
                if not deliveries:
                    deliveries = await self.queue.read(self.categories, self.name, count, self.settings.worker_block_s)
                by_category: dict[str, list[Delivery]] = {}
                for d in deliveries:
                    by_category.setdefault(d.message.category, []).append(d)
                for category, group in by_category.items():
                    try:
                        await self.process(category, group)
                    except RedisUnavailable:
                        raise
                    except Exception:  # a bug: the jobs stay pending, are retried, then dead-lettered
                        log.exception("worker %s: processing %d %s job(s) failed", self.name, len(group), category)
            except RedisUnavailable as exc:
                if "NOGROUP" in str(exc.__cause__ or ""):  # the stream went away (Redis restarted empty)
                    await self._until_redis(lambda: self.queue.ensure_groups(self.categories))
                    continue
                log.warning("worker %s: Redis unavailable (%s); retrying in 1 s", self.name, exc)
                await self._sleep(1.0)

    async def _until_redis(self, fn: Any) -> None:
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

    # ------------------------------------------------------------------ one batch of jobs
    async def process(self, category: str, deliveries: list[Delivery]) -> None:
        loaded = await self.queue.records.load([d.job_id for d in deliveries])
        jobs: list[_Job] = []
        for delivery, (record, data) in zip(deliveries, loaded):
            if record is None or record.status in FINAL_STATES:
                # Expired, or finished by a worker that died before its XACK: nothing to redo.
                self.metrics.jobs.labels(category, "expired" if record is None else "duplicate").inc()
                await self.queue.ack(delivery)
            elif delivery.deliveries > self.settings.job_max_attempts:
                # Delivered too often without a recorded outcome: it kills (or hangs) its workers.
                error = record.error or ErrorBody(code="worker_lost", message=(
                    f"the job was delivered {delivery.deliveries} times and no worker finished it"))
                await self.queue.dead_letter(delivery, record, error, self.name)
                self.metrics.jobs.labels(category, "dead_lettered").inc()
            else:
                record = record.model_copy(update={"status": "running", "attempts": delivery.deliveries,
                                                   "worker": self.name, "updated_at": utcnow()})
                if await self.queue.records.write(record):
                    jobs.append(_Job(delivery, record, data))
                else:  # went final meanwhile
                    await self.queue.ack(delivery)
        if not jobs:
            return
        keep_alive = asyncio.create_task(self._keep_alive(category, [j.delivery.stream_id for j in jobs]))
        try:
            await self._test_stall(jobs)
            await self._run_jobs(category, jobs)
        finally:
            keep_alive.cancel()
        for job in jobs:
            await self._finish(category, job)

    async def _run_jobs(self, category: str, jobs: list[_Job]) -> None:
        try:
            model = self.registry.get(category)  # pinned for the whole batch of jobs
        except Exception as exc:
            for job in jobs:
                job.error = JobFailed("model_not_loaded", str(exc))
            return
        engine = model.engine
        for job in jobs:
            job.model = model
        await asyncio.gather(*(self._decode(job, model.manifest.input_size) for job in jobs))
        live = [(job, k) for job in jobs if job.error is None for k in range(len(job.images))]
        for job in jobs:
            job.scored = [None] * len(job.images)
        step = max(1, min(self.settings.max_batch_size, int(engine.max_batch_size)))
        for start in range(0, len(live), step):
            await self._score(category, engine, live[start:start + step])
        for job in jobs:
            if job.error is None:
                try:
                    job.record = await self._result(job, category)
                except JobFailed as exc:
                    job.error = exc
                except RedisUnavailable as exc:
                    job.error = JobFailed("redis_unavailable", f"cannot store the heatmap links: {exc}")

    async def _decode(self, job: _Job, size: int) -> None:
        if not job.data or len(job.data) != len(job.record.filenames):
            job.error = JobFailed("inputs_missing", "the job's images are gone (expired or never stored)")
            return
        try:
            job.images = list(await asyncio.gather(*(
                self.run_blocking(decode_image, data, size, self.limits, name)
                for data, name in zip(job.data, job.record.filenames))))
        except ImageRejected as exc:
            job.error = JobFailed(exc.code, exc.message)

    async def _score(self, category: str, engine: Any, chunk: list[tuple[_Job, int]]) -> None:
        loop = asyncio.get_running_loop()
        started, started_wall = time.monotonic(), utcnow()
        try:
            batch = np.stack([job.images[k].tensor for job, k in chunk])
            scores, maps = await loop.run_in_executor(self._engine_thread, engine.run, batch)
        except Exception as exc:  # the batch fails; every job in it is retried
            log.exception("%s: engine %s failed on a batch of %d", category, engine.name, len(chunk))
            for job, _ in chunk:
                job.error = job.error or JobFailed("engine_error", f"{type(exc).__name__}: {exc}")
            return
        engine_s = time.monotonic() - started
        self.metrics.observe_batch(category, engine.name, len(chunk), engine_s)
        for i, (job, k) in enumerate(chunk):
            queue_ms = max(0.0, (started_wall - _aware(job.record.created_at)).total_seconds() * 1e3)
            job.scored[k] = ItemResult(raw_score=float(scores[i]), anomaly_map=maps[i],
                                       batch_size=len(chunk), queue_ms=queue_ms, engine_ms=engine_s * 1e3)

    async def _result(self, job: _Job, category: str) -> JobRecord:
        if any(s is None for s in job.scored) or job.model is None:
            raise JobFailed("engine_error", "an image of the job was not scored")
        scored = [s for s in job.scored if s is not None]
        built = await build_results([(i, job.record.filenames[i], im, sc)
                                     for i, (im, sc) in enumerate(zip(job.images, scored))],
                                    job.model.manifest, job.record.options, self.run_blocking, self.links, job.started,
                                    policy=self.policy)
        results = [b.result for b in built]
        for r in results:
            self.metrics.count_image(category, r.is_anomalous)
        response = InspectResponse(request_id=job.record.request_id or job.record.id, category=category,
                                   model_version=results[0].model_version, engine=job.model.engine.name,
                                   results=results)
        return job.record.model_copy(update={"status": "done", "result": response, "error": None,
                                             "updated_at": utcnow()})

    async def _finish(self, category: str, job: _Job) -> None:
        """Final record + XACK, or a recorded failed attempt (retried later, or dead-lettered)."""
        try:
            if job.error is None:
                await self.queue.complete(job.delivery, job.record)
                self.metrics.jobs.labels(category, "done").inc()
            elif job.delivery.deliveries >= self.settings.job_max_attempts:
                await self.queue.dead_letter(job.delivery, job.record, job.error.error, self.name)
                self.metrics.jobs.labels(category, "dead_lettered").inc()
            else:
                log.warning("job %s attempt %d failed: %s: %s (retried after %.1f s)", job.record.id,
                            job.delivery.deliveries, job.error.error.code, job.error.error.message,
                            self.settings.job_claim_idle_s)
                # Left pending: XAUTOCLAIM hands it out again once idle past job_claim_idle_s.
                await self.queue.records.write(job.record.model_copy(update={
                    "status": "queued", "error": job.error.error, "updated_at": utcnow()}))
                self.metrics.jobs.labels(category, "retried").inc()
        except RedisUnavailable as exc:  # not acknowledged: another attempt will come
            log.warning("job %s: cannot record its outcome (%s); it will be redelivered", job.record.id, exc)

    async def _keep_alive(self, category: str, stream_ids: list[str]) -> None:
        every = max(0.1, self.settings.job_claim_idle_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self.queue.keep_alive(category, self.name, stream_ids)
            except RedisUnavailable:
                pass

    async def _test_stall(self, jobs: list[_Job]) -> None:
        name = self.settings.worker_test_stall_on
        if name and any(j.delivery.deliveries == 1 and name in j.record.filenames for j in jobs):
            log.warning("worker %s: worker_test_stall_on=%s: stalling mid-job (test hook)", self.name, name)
            await self._sleep(3600)

    async def close(self) -> None:
        await self.thresholds.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._engine_thread.shutdown(wait=False)
        await self.conn.aclose()


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
    return asyncio.run(_main(settings))


async def _main(settings: Settings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, registry=worker.metrics.registry)
    try:
        await worker.run()
    except Exception:
        log.exception("worker %s failed", worker.name)
        return 1
    finally:
        await worker.close()
    log.info("worker %s: stopped", worker.name)
    return 0
