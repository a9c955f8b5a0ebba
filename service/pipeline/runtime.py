"""The runtime the API and the worker share: :class:`ServiceState` (settings, metrics,
registry, one batcher per category, the thread pool, the Redis-backed stores).

:meth:`ServiceState.inspect` is the synchronous inspection path behind the route: result
model version pinned once per request (:meth:`ServiceState.pin`), cache lookup (per image,
one MGET), decode, batch on that version's batcher, score, results
(:func:`service.pipeline.postprocess.build_results`), cache write. Redis problems only ever cost the
cache and durable links, never the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from service.pipeline.batcher import Batched, Batcher, DeadlineExceeded, wait_results
from service.config import Settings
from service.pipeline.decode import DecodedImage, ImageLimits, ImageRejected, configure_pillow, decode_image, probe_image
from service.redisq.jobs import JobQueue
from service.metrics import ServiceMetrics
from service.redisq.connection import RedisConnection
from service.pipeline.registry import LoadedModel, ModelRegistry
from service.pipeline.recent import RecentScores
from service.pipeline.postprocess import Built, ItemResult, Rendered, build_results, policy_from_settings
from service.schemas import InspectOptions, Upload, HeatmapLink, ImageResult, Timings
from service.redisq.store import CachedResult, HeatmapLinks, ResultCache, utcnow
from service.pipeline.thresholds import ThresholdOverrides

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_INLINE_HASH_BYTES = 1 << 20  # hash larger uploads in the thread pool


class JobsUnavailable(RuntimeError):
    """Async jobs need Redis and this server has none configured."""


@dataclass
class Lane:
    """One loaded model version and its batcher. A request pins a lane (:meth:`ServiceState.pin`)
    and uses only it; a reload gives the new version a new lane, and the old one is drained
    once its last pinned request is done."""

    model: LoadedModel
    batcher: Batcher
    users: int = 0
    retired: bool = field(default=False)


@dataclass(frozen=True)
class Inspection:
    """The answer of :meth:`ServiceState.inspect`, in request order."""

    results: list[ImageResult]
    heats: list[Rendered | None]  # PNGs rendered for this request (None for cache hits)
    engines: list[str]  # engine that scored each image (for a hit: the one that scored it then)


class ServiceState:
    """What the routes share: settings, metrics, registry, one batcher per category, the pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.registry = ModelRegistry(settings, on_swap=self._swapped)
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        self.shutting_down = False
        self._lanes: dict[int, Lane] = {}  # by id(LoadedModel)
        self._draining: set[asyncio.Task[None]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._loading: asyncio.Task[None] | None = None
        self.redis = RedisConnection(settings, self.metrics) if settings.redis_url else None
        self.links = HeatmapLinks(settings, self.redis, memory=True, metrics=self.metrics)
        self.cache = ResultCache(settings, self.redis, self.metrics)
        self.jobs = JobQueue(settings, self.redis) if self.redis is not None else None
        # Runtime threshold overrides, defect regions, recent scores (service/thresholds.py, regions.py, recent.py)
        self.thresholds = ThresholdOverrides(settings, self.redis)
        self.registry.thresholds = self.thresholds
        self.recent = RecentScores(settings, self.metrics)
        self.result_policy = policy_from_settings(settings, self.thresholds.calibration)

    async def start(self) -> None:
        """Check the store (fail start-up if unusable), then load engines in the background so
        /healthz answers while big engines load; /readyz says when all are warm."""
        configure_pillow(self.settings.max_image_pixels)
        self.registry.discover()
        self._pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self._loading = asyncio.create_task(self._load_and_watch(), name="load-models")
        self.thresholds.start(self.registry.serving)

    async def _load_and_watch(self) -> None:
        """Load what is in the store, then pick up new categories and versions as they are exported."""
        await self.registry.load_all()
        while self.settings.store_poll_s and not self.shutting_down:
            await asyncio.sleep(self.settings.store_poll_s)
            try:
                await self.registry.refresh()
            except OSError as exc:  # the store vanished or is unreadable for a moment: look again later
                log.warning("model store scan failed: %s", exc)

    def begin_shutdown(self) -> None:
        """Readiness goes 503 at once (called from the SIGTERM handler, so only sets a flag)."""
        self.shutting_down = True

    async def stop(self) -> None:
        """Drain: queued and running batches finish, then the threads go."""
        self.shutting_down = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.thresholds.stop()
        await asyncio.gather(*(lane.batcher.drain(self.settings.graceful_shutdown_s)
                               for lane in self._lanes.values()), *self._draining)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.redis is not None:
            await self.redis.aclose()

    async def redis_status(self) -> Literal["ok", "degraded", "disabled"]:
        return "disabled" if self.redis is None else await self.redis.status()

    # ------------------------------------------------------------------ lanes: one batcher per loaded version
    def _swapped(self, model: LoadedModel) -> None:
        """Registry callback after a (re)load: older lanes of the category retire; idle ones drain now."""
        self.metrics.set_model(model.category, model.version, model.engine.name)
        for lane in list(self._lanes.values()):
            if lane.model.category == model.category and lane.model is not model:
                lane.retired = True
                self._release(lane)

    def _lane(self, model: LoadedModel) -> Lane:
        lane = self._lanes.get(id(model))
        if lane is None:
            # Created on first use, on the running loop. Not refused while only readiness is
            # down (shutdown_delay_s): load balancers may still route here until they notice.
            s, engine = self.settings, model.engine
            batcher = Batcher(model.category, _engine_runner(engine), label=engine.name,
                              max_batch_size=max(1, min(s.max_batch_size, int(engine.max_batch_size))),
                              max_queue_delay_s=s.max_queue_delay_ms / 1e3, max_queue_size=s.max_queue_size,
                              observer=self.metrics)
            lane = self._lanes[id(model)] = Lane(model, batcher)
        return lane

    def _release(self, lane: Lane) -> None:
        if lane.retired and lane.users == 0 and self._lanes.get(id(lane.model)) is lane:
            del self._lanes[id(lane.model)]
            task = asyncio.get_running_loop().create_task(lane.batcher.drain(self.settings.graceful_shutdown_s))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    @contextlib.contextmanager
    def pin(self, category: str) -> Iterator[Lane]:
        """The category's loaded version, resolved once: everything the request does (decode
        size, batching, threshold, version in the answer) uses this lane. Raises
        :class:`~service.pipeline.registry.ModelNotLoaded` / ``UnknownCategory``."""
        lane = self._lane(self.registry.get(category))
        lane.users += 1
        try:
            yield lane
        finally:
            lane.users -= 1
            self._release(lane)

    async def run_blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def decode_all(self, size: int, uploads: Sequence[Upload],
                         indices: Sequence[int] | None = None) -> list[DecodedImage]:
        """Decode to ``size`` in the pool; ``indices`` are the uploads' positions in the request (for errors)."""
        indices = range(len(uploads)) if indices is None else indices

        async def one(index: int, upload: Upload) -> DecodedImage:
            try:
                image = await self.run_blocking(decode_image, upload.data, size, self.limits, upload.filename)
            except ImageRejected as exc:
                exc.details = {**(exc.details or {}), "index": index, "filename": upload.filename}
                raise
            self.metrics.observe_stage("decode", image.decode_ms / 1e3)
            return image

        results = await asyncio.gather(*(one(i, u) for i, u in zip(indices, uploads)), return_exceptions=True)
        for r in results:  # the first failure in request order is the answer
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def score(self, lane: Lane, images: list[DecodedImage], deadline: float,
                    gone: Awaitable[None] | None = None) -> list[ItemResult]:
        """Queue every image on the pinned lane; wait for all, the deadline, or ``gone``
        (the client left: the images are dropped before the engine)."""
        futures = lane.batcher.submit_many([im.tensor for im in images], deadline)
        try:
            await wait_results(futures, deadline, gone)
        except DeadlineExceeded:
            self.metrics.count_rejection(lane.model.category, "deadline")
            raise
        return [_item_result(f.result()) for f in futures]  # raises an item's error, if any

    async def inspect(self, lane: Lane, uploads: Sequence[Upload], options: InspectOptions, deadline: float,
                      started: float, wants_png: bool = False,
                      gone: Callable[[], Awaitable[None]] | None = None) -> Inspection:
        """Answer every upload: from the result cache where the same bytes were inspected with
        the same model version, threshold and options, else decode + batch + score + render.
        The PNG answer (``wants_png``) bypasses the cache. ``gone()`` completes when the
        caller stops waiting (an HTTP client disconnecting)."""
        model = lane.model
        category = model.category
        n = len(uploads)
        use_cache = self.cache.enabled and not wants_png
        digests: list[str] = []
        hits: list[CachedResult | None] = [None] * n
        if use_cache:
            digests = [await self._digest(u.data) for u in uploads]
            threshold = self.thresholds.threshold(model.manifest)  # effective: an override changes the key
            hits = await self.cache.get_many([self.cache.key(d, category, model.version, threshold, options)
                                              for d in digests])
        todo = [i for i in range(n) if hits[i] is None]
        built: dict[int, Built] = {}
        engines: dict[int, str] = {}
        if todo:
            images = await self.decode_all(model.manifest.input_size, [uploads[i] for i in todo], todo)
            scored = await self.score(lane, images, deadline, gone() if gone is not None else None)
            made = await build_results([(i, uploads[i].filename, im, sc) for i, im, sc in zip(todo, images, scored)],
                                       model.manifest, options, self.run_blocking, self.links, started, render_all=wants_png,
                                       policy=self.result_policy)
            for i, b in zip(todo, made):
                built[i], engines[i] = b, model.engine.name
                if b.heat is not None:
                    self.metrics.observe_stage("render", b.heat.render_ms / 1e3)
            if use_cache:
                await self.cache.put_many([
                    (self.cache.key(digests[i], category, model.version, built[i].result.threshold, options),
                     CachedResult(engine=model.engine.name, result=built[i].result), _cache_ttl(built[i]))
                    for i in todo if built[i].durable])
        results: list[ImageResult] = []
        for i in range(n):
            hit = hits[i]
            if hit is None:
                results.append(built[i].result)
                continue
            engines[i] = hit.engine
            total = round((time.monotonic() - started) * 1e3, 3)
            results.append(hit.result.model_copy(update={
                "index": i, "filename": uploads[i].filename, "cached": True,
                "timings_ms": Timings(decode=0.0, queue=0.0, engine=0.0, render=0.0, total=total)}))
        for r in results:
            self.metrics.count_image(category, r.is_anomalous)
        self.recent.observe(category, results)
        return Inspection(results, [built[i].heat if i in built else None for i in range(n)],
                          [engines[i] for i in range(n)])

    async def _digest(self, data: bytes) -> str:
        if len(data) <= _INLINE_HASH_BYTES:
            return hashlib.sha256(data).hexdigest()
        return await self.run_blocking(lambda: hashlib.sha256(data).hexdigest())

    async def check_uploads(self, uploads: Sequence[Upload]) -> None:
        """Header checks (format, bytes, pixels) of uploads that are decoded later (jobs)."""
        for index, upload in enumerate(uploads):
            try:
                await self.run_blocking(probe_image, upload.data, self.limits, upload.filename)
            except ImageRejected as exc:
                exc.details = {**(exc.details or {}), "index": index, "filename": upload.filename}
                raise

    def require_jobs(self) -> JobQueue:
        if self.jobs is None:
            raise JobsUnavailable("async jobs need Redis: set MSFLOW_REDIS_URL (the synchronous "
                           "POST /v1/inspect/{category} works without it)")
        return self.jobs

    async def reload(self, category: str, version: str | None) -> LoadedModel:
        try:
            model = await self.registry.reload(category, version)
        except Exception:
            self.metrics.reloads.labels(category, "failed").inc()
            raise
        self.metrics.reloads.labels(category, "ok").inc()
        return model


def _engine_runner(engine: Any) -> Callable[[list[np.ndarray]], list[tuple[float, np.ndarray]]]:
    """The ``run_batch`` of an engine's batcher: stack, run, split per image."""
    def run_batch(tensors: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        scores, maps = engine.run(np.stack(tensors))
        if len(scores) != len(tensors) or len(maps) != len(tensors):
            raise RuntimeError(f"engine {engine.name} returned {len(scores)} scores / {len(maps)} maps "
                               f"for a batch of {len(tensors)}")
        return [(float(s), m) for s, m in zip(scores, maps)]
    return run_batch


def _item_result(batched: Batched[tuple[float, np.ndarray]]) -> ItemResult:
    raw_score, anomaly_map = batched.value
    return ItemResult(raw_score=raw_score, anomaly_map=anomaly_map, batch_size=batched.batch_size,
                      queue_ms=batched.queue_ms, engine_ms=batched.run_ms)


def _cache_ttl(built: Built) -> float:
    """A cached result must not outlive its heatmap link."""
    heatmap = built.result.heatmap
    if isinstance(heatmap, HeatmapLink):
        return (heatmap.expires_at - utcnow()).total_seconds()
    return float("inf")
