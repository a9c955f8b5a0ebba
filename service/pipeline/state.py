"""What the API's routes share: :class:`ServiceState`, the pipeline runtime plus what only a
serving replica needs: the result cache, recent scores, job submission, readiness.

:meth:`ServiceState.inspect` is the synchronous inspection path behind the route: the lane
pinned once per request (:meth:`~service.pipeline.runtime.PipelineRuntime.pin`), cache
lookup (per image, one MGET), then the runtime's inspect path for the misses
(:meth:`~service.pipeline.runtime.PipelineRuntime.run`: decode, batch, postprocess), cache
write. Redis problems only ever cost the cache and durable links, never the answer.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from service.config import Settings
from service.heap import report_collector_pauses
from service.metrics import ServiceMetrics
from service.pipeline.admission import AdmissionRefused, Ticket
from service.pipeline.engine_client import EngineClient
from service.pipeline.item import InspectedImage
from service.pipeline.recent import RecentScores
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.registry_errors import UnknownCategory
from service.pipeline.runtime import Lane, PipelineRuntime, rendering_for
from service.redisq.budget import maxmemory_warning
from service.redisq.connection import RedisConnection, make_client
from service.redisq.jobs import JobQueue
from service.redisq.probe import probe_forever
from service.redisq.store import CachedResult, ResultCache, deadline_share, utcnow
from service.redisq.tasks import cancel_and_wait
from service.schemas import HeatmapLink, InspectOptions, Timings, Upload

log = logging.getLogger(__name__)

_INLINE_HASH_BYTES = 1 << 20  # hash larger uploads in the thread pool


class JobsUnavailable(RuntimeError):
    """Async jobs need Redis and this server has none configured."""


def _bulk_timeout_s(settings: Settings) -> float:
    """The hot path's timeout plus the whole request body at 50 MB/s (a loaded Redis host)."""
    return settings.redis_socket_timeout_s + settings.max_request_bytes / 50e6


class ServiceState(PipelineRuntime):
    """The runtime of one API replica: the shared pipeline, plus cache, recent scores, jobs."""

    def __init__(self, settings: Settings) -> None:
        metrics = ServiceMetrics()  # created first: the connection counts its errors there
        redis = RedisConnection(settings, metrics) if settings.redis_url else None
        # A front end of a multi-process server (MSFLOW_API_PROCESSES > 1): engines and
        # batching live in the engine process, reached through this socket.
        link = EngineClient(settings, settings.engine_socket) if settings.engine_socket else None
        super().__init__(settings, redis, metrics=metrics, memory_links=True, engine_link=link)
        if link is not None:
            link.on_reload = self._follow_reload
        self.registry.on_load_failure = self._load_failed
        self.registry.on_failed_versions_changed = self._count_failed_versions
        self.shutting_down = False
        self._loading: asyncio.Task[None] | None = None
        self._collector_report: asyncio.Task[None] | None = None
        self._budget_check: asyncio.Task[None] | None = None
        self._redis_probe: asyncio.Task[None] | None = None
        self.cache = ResultCache(settings, self.redis, self.metrics)
        # Job submissions carry the images (up to max_request_bytes): their own connection, with
        # a timeout sized for that payload and no breaker, so a slow upload neither fails at the
        # per-command timeout of the hot path nor trips that path's breaker for everyone.
        self._bulk_redis = (RedisConnection(settings, metrics, breaker_s=0.0, client=make_client(
            settings, socket_timeout=_bulk_timeout_s(settings))) if settings.redis_url else None)
        self.jobs = JobQueue(settings, self._bulk_redis) if self._bulk_redis is not None else None
        # Status polls read one record, again every second or so per client: their own
        # connection, with a breaker. On a hung Redis one poll finds out (at the same timeout:
        # a finished record may be large) and the others answer 503 at once for
        # redis_breaker_s; over the submissions' connection each waited that timeout (3-6 s
        # with the retry), holding one of its connections, for a 503 saying Retry-After: 1.
        self._status_redis = (RedisConnection(settings, metrics, client=make_client(
            settings, socket_timeout=_bulk_timeout_s(settings))) if settings.redis_url else None)
        self.job_status = JobQueue(settings, self._status_redis) if self._status_redis is not None else None
        self.recent = RecentScores(settings, self.metrics, peers=link)  # link: every front end's, on demand

    async def start(self) -> None:
        """Check the store (fail start-up if unusable), then load engines in the background so
        /healthz answers while big engines load; /readyz says when all are warm.

        A front end of a multi-process server loads first instead: uvicorn listens once the
        app has started, and the kernel hands a new connection to any front end listening on
        the port, so one still loading (at start, or replacing one that died) would answer
        503 to connections the others could serve. Its loads only acquire what the engine
        process holds (or wait for it, up to a minute each); until the first front end is
        ready the port refuses connections."""
        categories = self.open()
        for category in categories:  # at 0 first: an alert's increase() misses a series born at 1
            self.metrics.model_load_failures.labels(category)
            self.metrics.model_versions_failed.labels(category).set(0)
        if self._bulk_redis is not None:
            self._budget_check = asyncio.create_task(self._check_redis_budgets(len(categories)),
                                                     name="redis-budgets")
        if self.engine_link is not None:
            # An operator's pins first (load_all leaves what they serve), and reloads made meanwhile.
            await self.engine_link.start_serving(self.registry.load_all)
            self._loading = asyncio.create_task(self.watch_store(), name="watch-store")
        else:
            self._loading = asyncio.create_task(self.load_and_watch(), name="load-models")
        # Once start-up can no longer fail, so that no task outlives a start that raised.
        self._collector_report = asyncio.create_task(
            report_collector_pauses(functools.partial(self.metrics.observe_gc_pauses, "api")), name="gc-pauses")
        if self.redis is not None:  # msflow_redis_up: a Redis down is seen with no traffic too
            self._redis_probe = asyncio.create_task(probe_forever(self.redis, self.metrics.set_redis_up,
                                                                  self.settings.redis_probe_s),
                                                    name="redis-probe")

    async def _check_redis_budgets(self, categories: int) -> None:
        """Once at start, on the bulk connection: a Redis not up yet must not trip the hot
        path's breaker."""
        assert self._bulk_redis is not None
        if (warning := await maxmemory_warning(self._bulk_redis, self.settings, max(1, categories))) is not None:
            log.warning("%s", warning)

    def begin_shutdown(self) -> None:
        """Readiness goes 503 at once (called from the SIGTERM handler, so only sets a flag)."""
        self.shutting_down = True

    async def stop(self) -> None:
        """Drain: queued and running batches finish, then the threads go."""
        self.shutting_down = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.close()
        # Awaited before the bulk connection closes under them; cancelled again until they end
        # (one cancel() can be lost during a Redis call: service/redisq/tasks.py).
        await cancel_and_wait([self._budget_check, self._collector_report, self._redis_probe])
        for conn in (self._bulk_redis, self._status_redis):
            if conn is not None:
                await conn.aclose()

    async def redis_status(self) -> Literal["ok", "degraded", "disabled"]:
        return "disabled" if self.redis is None else await self.redis.status()

    # ------------------------------------------------------------------ the synchronous inspection
    async def inspect(self, lane: Lane, uploads: Sequence[Upload], options: InspectOptions, deadline: float,
                      started: float, wants_png: bool = False,
                      gone: Callable[[], Awaitable[None]] | None = None,
                      hold: list[Ticket] | None = None) -> list[InspectedImage]:
        """Answer every upload (one record each, in request order, each with its ``result``):
        from the result cache where the same bytes were inspected with the same model
        version, threshold and options, else through the runtime's inspect path. The PNG
        answer (``wants_png``) bypasses the cache. ``gone()`` completes when the caller
        stops waiting (an HTTP client disconnecting). ``hold``: the ticket of the pixels admitted
        for the images run (none when all were cached) goes there, until the caller's
        ``call_done`` (:meth:`~service.pipeline.runtime.PipelineRuntime.run`)."""
        model = lane.model
        items = [InspectedImage.received(i, u) for i, u in enumerate(uploads)]
        use_cache = self.cache.enabled and not wants_png
        digests: list[str] = []
        if use_cache:
            digests = [await self._digest(u.data) for u in uploads]
            bounds = self.thresholds.calibration(model.manifest)  # effective: an override changes the key
            hits = await self.cache.get_many([self.cache.key(d, model.category, model.version, bounds.threshold,
                                                             options, bounds.ng_bound) for d in digests],
                                             within_s=deadline_share(deadline))
            for item, hit in zip(items, hits):
                if hit is not None:
                    self._answer_from_cache(item, hit, started)
        todo = [item for item in items if not item.cached]
        if todo:
            await self.run(lane, todo, options, deadline, started, render_all=wants_png,
                           gone=gone() if gone is not None else None, hold=hold)
            if use_cache:
                await self.cache.put_many([
                    (self.cache.key(digests[item.index], model.category, model.version, item.answer.threshold,
                                    options, item.answer.ng_threshold),
                     CachedResult(engine=model.engine.name, result=item.answer), _cache_ttl(item))
                    for item in todo if item.durable], within_s=deadline_share(deadline))
        for item in items:
            if item.cached:
                self.metrics.count_image(model.category, item.answer.is_anomalous, item.answer.verdict)
        # The drift metrics and recent scores see each part once: a hit is the same bytes sent
        # again (a client's retry), and counting it moved the score histogram and anomaly rate.
        self.recent.observe(model.category, [item.answer for item in items if not item.cached])
        return items

    def _answer_from_cache(self, item: InspectedImage, hit: CachedResult, started: float) -> None:
        total = round((time.monotonic() - started) * 1e3, 3)
        item.cached, item.engine = True, hit.engine
        item.result = hit.result.model_copy(update={
            "index": item.index, "filename": item.filename, "cached": True,
            "timings_ms": Timings(decode=0.0, queue=0.0, engine=0.0, render=0.0, total=total)})

    async def _digest(self, data: bytes) -> str:
        if len(data) <= _INLINE_HASH_BYTES:
            return hashlib.sha256(data).hexdigest()
        return await self.run_blocking(lambda: hashlib.sha256(data).hexdigest())

    # ------------------------------------------------------------------ jobs (the API side) and reloads
    async def check_uploads(self, category: str, uploads: Sequence[Upload], options: InspectOptions) -> None:
        """What the header tells of uploads decoded later by a worker (jobs): format, bytes,
        pixels, and the per-request pixel budget at the version now served (413 now, rather
        than a job that can only fail)."""
        with self.pin(category) as lane:
            items = [InspectedImage.received(i, u) for i, u in enumerate(uploads)]
            await self.probe(lane.model.manifest.input_size, items, rendering_for(options, render_all=False))
        try:
            self.pixels.check_request(sum(item.cost for item in items))
        except AdmissionRefused as exc:
            self.metrics.count_rejection(category, exc.code)
            raise

    def require_jobs(self) -> JobQueue:
        if self.jobs is None:
            raise JobsUnavailable("async jobs need Redis: set MSFLOW_REDIS_URL (the synchronous "
                                  "POST /v1/inspect/{category} works without it)")
        return self.jobs

    def require_job_status(self) -> JobQueue:
        """The jobs as status polls read them (a connection with a breaker: see ``__init__``)."""
        self.require_jobs()
        assert self.job_status is not None
        return self.job_status

    async def reload(self, category: str, version: str | None) -> LoadedModel:
        try:
            model = await self.registry.reload(category, version)
        except UnknownCategory:
            raise  # not counted: the name is the client's, and each would become a series
        except Exception:
            self.metrics.reloads.labels(category, "failed").inc()
            raise
        self.metrics.reloads.labels(category, "ok").inc()
        if self.engine_link is not None:
            self.engine_link.broadcast_reload(category, version)  # the other front ends follow
        return model

    def _load_failed(self, category: str) -> None:
        """A version of ``category`` failed to load (start-up, the store watch, a reload)."""
        self.metrics.model_load_failures.labels(category).inc()
        self._count_failed_versions(category)

    def _swapped(self, model: LoadedModel) -> None:
        super()._swapped(model)
        self.metrics.model_load_failures.labels(model.category)  # at 0, for a category the watch found
        self._count_failed_versions(model.category)

    def _count_failed_versions(self, category: str) -> None:
        self.metrics.model_versions_failed.labels(category).set(len(self.registry.failed_versions(category)))

    async def _follow_reload(self, category: str, version: str | None) -> None:
        """Another front end of this server reloaded ``category``: serve what it serves. Not
        counted as a reload (the operator's front end counted it: /metrics adds up the front
        ends), but a failure to follow is."""
        try:
            # A pin in force, not a new choice: served from the engine process's memory if its
            # folder left the store, else the category fails (never another version).
            await self.registry.reload(category, version, in_force=True)
        except Exception as exc:
            self.metrics.reloads.labels(category, "failed").inc()
            log.error("following the reload of %s (version %s) failed: %s", category, version, exc)


def _cache_ttl(item: InspectedImage) -> float:
    """A cached result must not outlive its heatmap link."""
    heatmap = item.answer.heatmap
    if isinstance(heatmap, HeatmapLink):
        return (heatmap.expires_at - utcnow()).total_seconds()
    return float("inf")
