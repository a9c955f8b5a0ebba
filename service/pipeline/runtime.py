"""The pipeline runtime: what the API and the worker both run, and the only inspect path.

:class:`PipelineRuntime` owns the model registry, one lane (loaded model version + its
batcher: :mod:`service.pipeline.lanes`) per version in use, the thread pool, heatmap
links and threshold overrides. It knows neither HTTP nor the job queue: the API's
:class:`service.pipeline.state.ServiceState` adds the result cache and job submission on
top, and :mod:`service.worker` drives it from the Redis streams. So a job and a synchronous
request go through the very same code:

``pin`` a lane once -> :meth:`~PipelineRuntime.run`: probe the headers and admit the request
by decoded pixels (:mod:`service.pipeline.admission`) and queue room, before any decoding ->
decode (thread pool; the loop for a small request: :mod:`service.pipeline.placement`) -> the
lane's batcher (concurrent requests *and* jobs of a category share its batches) ->
postprocess (score, verdict, heatmap, regions) -> ``result`` on each
:class:`~service.pipeline.item.InspectedImage`. The deadline covers all of it, from arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

import numpy as np

from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.admission import MEGA, AdmissionRefused, PixelBudget, Ticket
from service.pipeline.batch_queue import Batched, DeadlineExceeded, submit_when_room, wait_results
from service.pipeline.engine_client import EngineClient, RemoteEngine
from service.pipeline.decode import ImageLimits, ImageRejected, Rendering, configure_pillow, decode_into, probe_into
from service.pipeline.item import InspectedImage
from service.pipeline.lanes import Lane, Lanes
from service.pipeline.offload import Offload, gather_in_order
from service.pipeline.placement import probe_on_loop, work_on_loop
from service.pipeline.postprocess import NonFiniteMaps, NonFiniteOutput, policy_from_settings, postprocess
from service.pipeline.loaded_model import EngineFactory, LoadedModel
from service.pipeline.registry import ModelRegistry
from service.pipeline.review import ReviewCapture
from service.pipeline.thresholds import ThresholdOverrides
from service.engines.factory import load_engine
from service.redisq.connection import RedisConnection
from service.redisq.store import HeatmapLinks
from service.schemas import HeatmapMode, InspectOptions

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class PipelineRuntime:
    """Registry, lanes, thread pool, links, thresholds: the inspect path, without HTTP or jobs.

    ``redis``: the connection links and threshold overrides use (None: this host only).
    ``memory_links``: keep ``heatmap=url`` PNGs in this process too (the API, which serves
    them); the worker passes False, since it serves nothing: its links must be in Redis.
    ``link_ttl_s``: how long a link lives (None: ``heatmap_ttl_s``; the worker's: ``job_ttl_s``).
    ``engine_link``: a front end of a multi-process server runs its engines and forms its
    batches in the engine process (:mod:`service.pipeline.engine_client`), not here.
    """

    def __init__(self, settings: Settings, redis: RedisConnection | None, *, metrics: ServiceMetrics | None = None,
                 memory_links: bool = True, link_ttl_s: float | None = None,
                 engine_factory: EngineFactory = load_engine, engine_link: EngineClient | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.redis = redis
        self.engine_link = engine_link
        if engine_link is not None:
            engine_factory = engine_link.engine_factory
            engine_link.on_connected = self._retry_failed
        self.registry = ModelRegistry(settings, engine_factory=engine_factory, on_swap=self._swapped)
        self.registry.on_drop = self._dropped
        self.registry.on_retire = self._retired
        if engine_link is not None:
            engine_link.on_lost = self.registry.lost
            engine_link.on_peer_retired = self.registry.end_pin
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                                  max_heatmap_pixels=settings.max_heatmap_pixels)
        self.pixels = PixelBudget(int(settings.max_request_megapixels * MEGA), int(settings.max_inflight_megapixels * MEGA),
                                  on_change=self.metrics.pixels_in_flight.set)
        self.closing = False
        self.lanes = Lanes(settings, self.metrics, engine_link)
        self._pool: Offload | None = None
        self.links = HeatmapLinks(settings, redis, memory=memory_links, metrics=self.metrics, ttl_s=link_ttl_s)
        # Runtime threshold overrides (thresholds.py): the same effective thresholds on every
        # replica and worker, since they live in Redis (and beside the store's manifests).
        self.thresholds = ThresholdOverrides(settings, redis)
        self.registry.thresholds = self.thresholds
        self.result_policy = policy_from_settings(settings, self.thresholds.calibration)
        self.review = ReviewCapture(settings, self.metrics)  # review verdicts + audit sample -> the review store

    # ------------------------------------------------------------------ life cycle
    def open(self) -> list[str]:
        """Check the store (raises :class:`~service.pipeline.registry_errors.RegistryError` when it is
        unusable), start the thread pool and the threshold sync. Returns the categories found.
        Call from the running event loop; loading is :meth:`load_and_watch`'s."""
        configure_pillow(self.settings.max_image_pixels)
        found = self.registry.discover()
        if self.engine_link is not None:
            self.engine_link.start()
        self._pool = Offload(self.settings.decode_threads, "decode")
        self.thresholds.start(self.registry.serving)
        self.review.start()
        return found

    async def watch_store(self) -> None:
        """Follow the store every ``store_poll_s``: new categories and versions as they are
        exported, and what has left it for ``store_removal_grace_s`` (:meth:`ModelRegistry.refresh`)."""
        while self.settings.store_poll_s and not self.closing:
            await asyncio.sleep(self.settings.store_poll_s)
            try:
                await self.registry.refresh()
            except OSError as exc:  # the store vanished or is unreadable for a moment: look again later
                log.warning("model store scan failed: %s", exc)
            except Exception:  # anything else a store can hold: the watch outlives one bad scan
                log.exception("model store scan failed")

    async def load_and_watch(self) -> None:
        """Load what is in the store, then watch it."""
        await self.registry.load_all()
        await self.watch_store()

    async def close(self) -> None:
        """Drain: queued and running batches finish, then the threads and the connection go."""
        self.closing = True
        await self.thresholds.stop()
        await self.lanes.drain()
        await self.review.stop()  # after the drain: the last answers' captures are queued by then
        if self.engine_link is not None:
            await self.engine_link.close()
        if self._pool is not None:
            self._pool.close()
        if self.redis is not None:
            await self.redis.aclose()

    # ------------------------------------------------------------------ lanes: one batcher per loaded version
    def _swapped(self, model: LoadedModel) -> None:
        """Registry callback after a (re)load: older lanes of the category retire; idle ones drain now."""
        self.metrics.set_model(model.category, model.version, model.engine.name)
        if self.engine_link is not None and isinstance(model.engine, RemoteEngine):  # now, not at the acquire
            self.engine_link.swapped_in(model.engine.hold)
        self.lanes.retire(lambda lane_model: lane_model.category != model.category or lane_model is model)

    def _dropped(self, model: LoadedModel) -> None:
        """Registry callback: ``model`` stopped serving with nothing in its place; its lanes
        retire and the engine process's hold on it goes, as at a swap."""
        self._stop_holding(model)
        self.lanes.retire(lambda lane_model: lane_model is not model)

    def _stop_holding(self, model: LoadedModel) -> None:
        """The engine process's hold on ``model`` goes (multi-process mode; nothing in one process)."""
        if self.engine_link is not None and isinstance(model.engine, RemoteEngine):
            self.engine_link.stopped_serving(model.category, model.engine.hold)

    def _retired(self, category: str, model: LoadedModel | None) -> None:
        """Registry callback: the store watch retired ``category`` (its folder left the store):
        what served it drains as at a swap, and its gauges go (:meth:`ServiceMetrics.forget_category`),
        again after each drain of its lanes (a batch finishing writes its queue depth), unless it
        is back by then: the lanes of versions swapped out before too, whose last requests or
        jobs may finish after the retirement."""
        def forget() -> None:
            if self.registry.removed_note(category) is not None:
                self.metrics.forget_category(category)
        if model is not None:
            self._stop_holding(model)
        self.lanes.retire(lambda lane_model: lane_model.category != category, forget)  # the served one's too
        if self.engine_link is not None:  # an operator's pin of it is no pin once it is back
            self.engine_link.retired(category)
        forget()

    async def _retry_failed(self) -> None:
        """Connected to the engine process (the first time too): categories whose load failed
        while it was away get another try (the registry would otherwise wait for a newer version)."""
        for category in list(self.registry.failed):
            try:
                await self.registry.retry(category)  # the version a pin holds it to, if one does
            except Exception as exc:  # still failing: reported as before
                log.error("%s: load failed again after the engine process came back: %s", category, exc)

    @property
    def engine_connected(self) -> bool:
        """False while a front end has lost its engine process (it reconnects by itself)."""
        return self.engine_link is None or self.engine_link.connected

    def engine_stalled(self) -> dict[str, float]:
        """Category -> seconds, where the engine has been on work it has not answered for
        longer than ``engine_stall_s`` (a call that never returns, an engine process stopped):
        never the case of a busy engine, whose every batch ends within the request deadline."""
        limit = self.settings.engine_stall_s
        return self.lanes.stalled(time.monotonic(), limit) if limit > 0 else {}

    @contextlib.contextmanager
    def pin(self, category: str) -> Iterator[Lane]:
        """The category's loaded version, resolved once: everything the request (or batch of
        jobs) does (decode size, batching, threshold, version in the answer) uses this lane.
        Raises :class:`~service.pipeline.registry_errors.ModelNotLoaded` / ``UnknownCategory``."""
        lane = self.lanes.lane(self.registry.get(category))
        lane.users += 1
        try:
            yield lane
        finally:
            lane.users -= 1
            self.lanes.release(lane)

    async def run_blocking(self, fn: Callable[..., _T], *args: Any, ticket: Ticket | None = None,
                           on_loop: bool = False) -> _T:
        """``fn(*args)`` in the decode threads. ``ticket``: the request's pixels stay admitted
        until the call returns, even if the request itself gave up on it (a deadline).
        ``on_loop``: right here instead, for work smaller than a thread hand-off
        (:mod:`service.pipeline.placement` decides)."""
        if self._pool is None:
            raise RuntimeError("the runtime is not open")
        if on_loop:
            return fn(*args)
        return await self._pool.call(fn, *args, tracker=ticket)

    # ------------------------------------------------------------------ the inspect path, stage by stage
    async def probe(self, size: int, items: Sequence[InspectedImage], rendering: Rendering) -> bool:
        """Header checks and prices of every record, in one call (no pixel buffers): on the
        loop for a small request (:mod:`service.pipeline.placement`), else in the pool.
        Returns whether it ran on the loop."""
        def probe_all() -> None:
            for item in items:
                try:
                    probe_into(item, size, self.limits, rendering)
                except ImageRejected as exc:
                    exc.details = {**(exc.details or {}), "index": item.index, "filename": item.filename}
                    raise
        on_loop = probe_on_loop(items, self.settings.loop_work_pixels)
        await self.run_blocking(probe_all, on_loop=on_loop)
        return on_loop

    async def admit(self, lane: Lane, items: Sequence[InspectedImage], deadline: float, *,
                    wait_for_room: bool = False) -> Ticket:
        """The request's pixels and room in its category's queue, before any decoding: 413 over
        the per-request budget, 503 while the queue is full or the budget is taken by others
        (the API sheds load), after a wait only while other categories hold the share of the
        budget that is this one's (:meth:`~service.pipeline.admission.PixelBudget.admit_fairly`).
        ``wait_for_room`` (the worker, which already took the job): waits for the pixels instead."""
        pixels, category = sum(item.cost for item in items), lane.model.category
        if wait_for_room:
            return await self.pixels.wait_admit(pixels, deadline, category)
        lane.batcher.check_room(len(items))  # a full queue refuses before the decode, not after
        try:
            return await self.pixels.admit_fairly(pixels, category, deadline)
        except AdmissionRefused as exc:
            self.metrics.count_rejection(category, exc.code)
            raise

    async def decode(self, size: int, items: Sequence[InspectedImage], ticket: Ticket | None = None,
                     on_loop: bool = False) -> None:
        """Decode every (probed) record to ``size`` in the pool (``on_loop``: here); the first
        failure in order is raised (an :class:`ImageRejected` names the image's index and filename)."""
        async def one(item: InspectedImage) -> None:
            try:
                await self.run_blocking(decode_into, item, size, self.limits, ticket=ticket, on_loop=on_loop)
            except ImageRejected as exc:
                exc.details = {**(exc.details or {}), "index": item.index, "filename": item.filename}
                raise
            self.metrics.observe_stage("decode", item.decode_ms / 1e3)

        await gather_in_order([one(item) for item in items])

    async def score(self, lane: Lane, items: Sequence[InspectedImage], deadline: float,
                    gone: Awaitable[None] | None = None, *, wait_for_room: bool = False,
                    lent: list[asyncio.Future[Any]] | None = None) -> None:
        """Queue every record on the pinned lane's batcher; wait for all, the deadline, or
        ``gone`` (the client left: the images are dropped before the engine). Raises the
        first image's error (an engine failure fails every image of its batch).

        ``wait_for_room``: wait while the batcher's queue is full instead of raising
        :class:`~service.pipeline.batch_queue.QueueFull`. The API sheds load (503); a worker has
        already taken the job, so it applies back-pressure instead and reads no more meanwhile.
        ``lent``: the maps may be views of a front end's slots, read in place: the futures go
        into it before anything awaits, for ``lane.batcher.release`` once the maps are read.
        """
        tensors = [item.model_input for item in items]
        lend = lent is not None
        if wait_for_room:
            futures = await submit_when_room(lane.batcher, tensors, deadline, lend=lend)
        else:
            futures = lane.batcher.submit_many(tensors, deadline, lend=lend)
        if lent is not None:
            lent += futures
        try:
            await wait_results(futures, deadline, gone)
        except DeadlineExceeded:
            self.metrics.count_rejection(lane.model.category, "deadline")
            raise
        for item, future in zip(items, futures):
            batched: Batched[tuple[float, np.ndarray]] = future.result()  # raises the item's error, if any
            item.raw_score, item.anomaly_map = batched.value
            item.batch_size, item.engine_ms = batched.batch_size, batched.run_ms
            item.queue_ms += batched.queue_ms
            item.engine = lane.model.engine.name
        self._refuse_non_finite(lane, items)

    def _refuse_non_finite(self, lane: Lane, items: Sequence[InspectedImage]) -> None:
        """A NaN or infinite score compares False with any threshold, i.e. "normal": never
        let it become a verdict, a cache entry, a job result or a drift sample. The maps are
        checked by :meth:`postprocess`, in the thread that reads them."""
        bad = [item for item in items if item.raw_score is None or not math.isfinite(item.raw_score)
               or item.anomaly_map is None]
        if bad:
            self._refuse(lane, bad)

    def _refuse(self, lane: Lane, bad: Sequence[InspectedImage]) -> NoReturn:
        model = lane.model
        self.metrics.nonfinite.labels(model.category, model.engine.name).inc(len(bad))
        self.registry.mark_unhealthy(model.category, f"version {model.version} on {model.engine.name} produced "
                                     f"non-finite output for {len(bad)} image(s)")
        first = bad[0]
        raise NonFiniteOutput(f"the model produced a non-finite score or map for image {first.index}"
                              f"{f' ({first.filename})' if first.filename else ''}; no verdict is given",
                              index=first.index, filename=first.filename)

    async def postprocess(self, lane: Lane, items: Sequence[InspectedImage], options: InspectOptions,
                          started: float, render_all: bool = False, ticket: Ticket | None = None,
                          on_loop: bool = False, deadline: float | None = None) -> None:
        """Score, verdict, heatmap and regions with the pinned version's (effective) calibration
        (heatmap and regions in the pool; ``on_loop``: here). ``deadline``: the links' (a slow
        Redis costs a link its durability, not the answer)."""
        blocking = functools.partial(self.run_blocking, ticket=ticket, on_loop=on_loop)
        try:
            await postprocess(items, lane.model.manifest, options, blocking,
                              self.links, started, render_all=render_all, policy=self.result_policy,
                              deadline=deadline)
        except NonFiniteMaps as exc:
            self._refuse(lane, exc.items)
        for item in items:
            if item.heatmap_png is not None:
                self.metrics.observe_stage("render", item.render_ms / 1e3)
            self.metrics.count_image(lane.model.category, item.answer.is_anomalous, item.answer.verdict)
        self.review.offer(lane.model.category, lane.model.engine.name, lane.model.manifest.calibration, items)

    async def run(self, lane: Lane, items: Sequence[InspectedImage], options: InspectOptions, deadline: float,
                  started: float, *, render_all: bool = False, gone: Awaitable[None] | None = None,
                  wait_for_room: bool = False, hold: list[Ticket] | None = None) -> None:
        """The inspect path: probe and admit -> decode -> the lane's batcher -> postprocess.
        Afterwards every record has its ``result``, or this raised the first failure (the
        records show how far each image got: :attr:`~service.pipeline.item.InspectedImage.stage`).
        ``started`` is the ``time.monotonic()`` the results' total time counts from; nothing
        runs past ``deadline`` (:class:`DeadlineExceeded`, decode and render included).

        Admission comes before any decoding: the request's price in decoded pixels
        (413 over the per-request budget; 503 while the server's budget is taken, or at the
        deadline after a fair wait for room) and room in the category's queue (503).
        ``wait_for_room`` (the worker, which already took the job) waits for both instead of
        refusing. ``hold``: the request's ticket is added to it, its
        pixels admitted until the caller's :meth:`~service.pipeline.admission.Ticket.call_done`
        (the API, once its client has taken the answer), even when this raises.
        """
        size = lane.model.manifest.input_size
        rendering = rendering_for(options, render_all)
        timeout = asyncio.timeout(max(0.0, deadline - time.monotonic()))
        try:
            async with timeout:
                probed_on_loop = await self.probe(size, items, rendering)
                # A wait for room ends at the deadline by itself, refused as the budget refuses
                # (503): a request never admitted did not time out (504). Both timers at one
                # instant made the answer whichever fired first.
                timeout.reschedule(None)
                ticket = await self.admit(lane, items, deadline, wait_for_room=wait_for_room)
                timeout.reschedule(asyncio.get_running_loop().time() + deadline - time.monotonic())
                if hold is not None:
                    ticket.call_started()
                    hold.append(ticket)
                small = probed_on_loop and work_on_loop(items, self.settings.loop_work_pixels)
                self.metrics.count_work_placement(small)
                with ticket:
                    lent: list[asyncio.Future[Any]] = []
                    try:
                        await self.decode(size, items, ticket, on_loop=small)
                        await self.score(lane, items, deadline, gone, wait_for_room=wait_for_room, lent=lent)
                        await self.postprocess(lane, items, options, started, render_all, ticket, on_loop=small,
                                               deadline=deadline)
                    finally:
                        for item in items:
                            item.display = None  # the request's pixels go with its ticket
                        if lane.batcher.release(lent):  # the maps' readers are done (a capture copies)
                            for item in items:
                                item.anomaly_map = None  # a view of a front end's slot, reused now
        except TimeoutError as exc:
            if not timeout.expired():
                raise
            self.metrics.count_rejection(lane.model.category, "deadline")
            raise DeadlineExceeded("the deadline passed before the answer was ready "
                                   f"(stage reached: {min((i.stage for i in items), key=_STAGE_ORDER.index)})") from exc
        finally:
            if inspect.iscoroutine(gone) and inspect.getcoroutinestate(gone) == inspect.CORO_CREATED:
                gone.close()  # refused before anything waited on it: no "never awaited" warning


_STAGE_ORDER = ("received", "decoded", "scored", "answered")


def rendering_for(options: InspectOptions, render_all: bool) -> Rendering:
    """What the request renders per image (the probe prices it)."""
    if not render_all and options.heatmap is HeatmapMode.none:
        return Rendering()
    return Rendering(heatmap=options.heatmap_size.value, overlay=options.overlay)
