"""The runtime the API and the worker share: :class:`ServiceState` (settings, metrics,
registry, one batcher per category, the thread pool, the Redis-backed stores).

:meth:`ServiceState.inspect` is the synchronous inspection path behind the route: result
cache lookup (per image, one MGET), decode, batch, score, results
(:func:`service.pipeline.postprocess.build_results`), cache write. Redis problems only ever cost the
cache and durable links, never the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi import Request

from service.pipeline.batcher import Batcher, DeadlineExceeded, InputSizeChanged, ItemResult, wait_results
from service.config import Settings
from service.pipeline.decode import (DecodedImage, ImageLimits, ImageRejected, configure_pillow, decode_image,
                             model_input, probe_image)
from service.redisq.jobs import JobQueue
from service.metrics import ServiceMetrics
from service.redisq.connection import RedisConnection
from service.pipeline.registry import LoadedModel, ModelRegistry
from service.pipeline.recent import RecentScores
from service.pipeline.postprocess import Built, Rendered, build_results, policy_from_settings
from service.schemas import InspectOptions, Upload, HeatmapLink, ImageResult, Timings
from service.redisq.store import CachedResult, HeatmapLinks, ResultCache, utcnow
from service.pipeline.thresholds import ThresholdOverrides

_T = TypeVar("_T")
_INLINE_HASH_BYTES = 1 << 20  # hash larger uploads in the thread pool


class JobsUnavailable(RuntimeError):
    """Async jobs need Redis and this server has none configured."""


class ModelChanging(RuntimeError):
    """The model changed repeatedly while the request waited."""


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
        self.registry = ModelRegistry(settings, on_swap=lambda m: self.metrics.set_model(
            m.category, m.version, m.engine.name))
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
        self.shutting_down = False
        self._batchers: dict[str, Batcher] = {}
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
        self._loading = asyncio.create_task(self.registry.load_all(), name="load-models")
        self.thresholds.start(self.registry.serving)

    def begin_shutdown(self) -> None:
        """Readiness goes 503 at once (called from the SIGTERM handler, so only sets a flag)."""
        self.shutting_down = True

    async def stop(self) -> None:
        """Drain: queued and running batches finish, then the threads go."""
        self.shutting_down = True
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self.thresholds.stop()
        await asyncio.gather(*(b.drain(self.settings.graceful_shutdown_s) for b in self._batchers.values()))
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.redis is not None:
            await self.redis.aclose()

    async def redis_status(self) -> Literal["ok", "degraded", "disabled"]:
        return "disabled" if self.redis is None else await self.redis.status()

    def batcher(self, category: str) -> Batcher:
        # Created on first use, on the running loop. Not refused while only readiness is down
        # (shutdown_delay_s): load balancers may still route here until they notice.
        b = self._batchers.get(category)
        if b is None:
            s = self.settings
            b = Batcher(category, lambda: self.registry.engine(category), max_batch_size=s.max_batch_size,
                        max_queue_delay_s=s.max_queue_delay_ms / 1e3, max_queue_size=s.max_queue_size,
                        observer=self.metrics)
            self._batchers[category] = b
        return b

    async def run_blocking(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def decode_all(self, category: str, uploads: Sequence[Upload],
                         indices: Sequence[int] | None = None) -> list[DecodedImage]:
        """Decode in the pool; ``indices`` are the uploads' positions in the request (for errors)."""
        size = self.registry.get(category).manifest.input_size
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

    async def score(self, category: str, images: list[DecodedImage], deadline: float,
                    request: Request) -> list[ItemResult]:
        """Queue every image; wait for all, the deadline, or the client leaving (then the
        images are dropped before the engine). Resubmits if a reload changed the input size."""
        results: dict[int, ItemResult] = {}
        todo = list(range(len(images)))
        for _ in range(3):
            size = self.registry.get(category).manifest.input_size
            tensors = [images[i].tensor if images[i].tensor.shape[0] == size else model_input(images[i].rgb, size)
                       for i in todo]
            futures = self.batcher(category).submit_many(tensors, deadline)
            try:
                await wait_results(futures, deadline, _disconnected(request))
            except DeadlineExceeded:
                self.metrics.count_rejection(category, "deadline")
                raise
            retry = []
            for i, fut in zip(todo, futures):
                if isinstance(fut.exception(), InputSizeChanged):
                    retry.append(i)
                else:
                    results[i] = fut.result()  # raises the item's error, if any
            if not retry:
                return [results[i] for i in range(len(images))]
            todo = retry
        raise ModelChanging("the model changed repeatedly while the request waited; retry")

    async def inspect(self, request: Request, category: str, uploads: Sequence[Upload], options: InspectOptions,
                      deadline: float, started: float, wants_png: bool = False) -> Inspection:
        """Answer every upload: from the result cache where the same bytes were inspected with
        the same model version, threshold and options, else decode + batch + score + render.
        The PNG answer (``wants_png``) bypasses the cache."""
        model = self.registry.get(category)
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
            images = await self.decode_all(category, [uploads[i] for i in todo], todo)
            scored = await self.score(category, images, deadline, request)
            made = await build_results([(i, uploads[i].filename, im, sc) for i, im, sc in zip(todo, images, scored)],
                                       options, self.run_blocking, self.links, started, render_all=wants_png,
                                       policy=self.result_policy)
            for i, b, sc in zip(todo, made, scored):
                built[i], engines[i] = b, sc.engine.name
                if b.heat is not None:
                    self.metrics.observe_stage("render", b.heat[2] / 1e3)
            if use_cache:
                await self.cache.put_many([
                    (self.cache.key(digests[i], category, sc.engine.manifest.version,
                                    built[i].result.threshold, options),
                     CachedResult(engine=sc.engine.name, result=built[i].result), _cache_ttl(built[i]))
                    for i, sc in zip(todo, scored) if built[i].durable])
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


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is already read, so the next ASGI
    message can only be ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cache_ttl(built: Built) -> float:
    """A cached result must not outlive its heatmap link."""
    heatmap = built.result.heatmap
    if isinstance(heatmap, HeatmapLink):
        return (heatmap.expires_at - utcnow()).total_seconds()
    return float("inf")
