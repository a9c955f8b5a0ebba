"""The worker's loop (:class:`Worker`): claim or read jobs from the category streams, hand
each category's to its :class:`~service.worker.runner.JobRunner` (which runs them and records
each outcome), keep the claims on the jobs in hand alive and beat the heartbeat (the package's
docstring tells the whole flow)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.runtime import PipelineRuntime
from service.redisq.connection import RedisConnection, RedisUnavailable, make_client
from service.redisq.jobs import Delivery, JobQueue
from service.redisq.probe import probe_forever
from service.redisq.tasks import cancel_and_wait
from service.worker.categories import ConsumedCategories
from service.worker.claim_holdoff import claim_hold_off_s, keep_alive_every_s, socket_timeout_s
from service.worker.inputs import InputBudget
from service.worker.runner import JobRunner, sleep_unless_stopped

log = logging.getLogger("service.worker")


class Worker:
    def __init__(self, settings: Settings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = ServiceMetrics()
        client = make_client(settings, socket_timeout=socket_timeout_s(settings))  # no breaker: a worker waits
        self.conn = RedisConnection(settings, self.metrics, client=client, breaker_s=0.0)
        self.runtime = PipelineRuntime(settings, self.conn, metrics=self.metrics, memory_links=False,
                                       link_ttl_s=settings.job_ttl_s)
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
        self.runner = JobRunner(settings, self.name, queue=self.queue, runtime=self.runtime, inputs=self.inputs,
                                metrics=self.metrics, conn=self.conn, stop=self.stop, failed=self._failed)
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
        self._tasks.append(asyncio.create_task(probe_forever(self.conn, self.metrics.set_redis_up,
                                                                self.settings.redis_probe_s), name="redis-probe"))
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
            outcomes = await asyncio.gather(*(self.runner.process(c, group, held[c])
                                              for c, group in by_category.items()), return_exceptions=True)
        finally:
            # Ended for sure: one that lost its cancel() would keep these claims alive for good.
            await cancel_and_wait([keep_alive])
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
        await sleep_unless_stopped(self.stop, seconds)

    # ------------------------------------------------------------------ claims and heartbeats
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
        # Ended before the leave, cancelled again until they end (a cancel() can be lost during a
        # Redis call: service/redisq/tasks.py): a heartbeat beating on would undo the leave, and a
        # gather of tasks still running never returned.
        await cancel_and_wait([*self._tasks, self._heartbeat])
        if self._heartbeat is not None:
            try:  # a clean stop leaves at once, rather than counting as alive until its beat runs out
                await self.queue.workers.leave(self.name, self.categories)
            except RedisUnavailable:
                pass
        await self.runtime.close()


__all__ = ["Worker"]
