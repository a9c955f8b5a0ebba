"""The engines the engine process hosts, by version folder and content, and the one batcher of each.

Every front end feeds the same :class:`~service.pipeline.batcher.Batcher` per loaded folder
(``submit``: its ``handle``, the number given on ``acquire``), so the batches fill from all
of them (``msflow_batch_frontends`` counts how many fed each batch); the engine reads the
inputs from the front ends' slots and writes the maps into them. A warm-up (``observed``
False) runs in the same batcher and is answered the same way, but no metric observes it;
the batcher's queue holds each front end's request slots and its warm-up slots on top.

A folder is loaded on a front end's first ``acquire`` (loaded and warmed once, shared by
the others) and unloaded a grace period after the last front end released it, so that a
front end restarting, or a request pinned to the old version just before a reload, still
finds it. A folder whose manifest changed since it was loaded (replaced under its number: a
category exported again, numbered 1 again; a copy over it) is loaded again on the next
acquire, as an entry of its own with its own handle: an acquire never hands back an engine
the folder no longer holds, and the front ends holding the one before keep it (requests
pinned to it finish) until each releases it by its handle.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.manifest import MANIFEST
from service.config import Settings
from service.engine_core.frontend import FrontEnd
from service.engines.base import Engine
from service.ipc import frames
from service.ipc.slab import Slab
from service.metrics import ServiceMetrics
from service.pipeline.batch_queue import Batched, BatcherClosed, DeadlineExceeded, QueueFull
from service.pipeline.batcher import Batcher, engine_runner
from service.pipeline.engine_slabs import warmup_slots
from service.pipeline.loaded_model import EngineFactory, warm_engine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Payload:
    """One image of a batch: where its input lies and where its map goes."""

    frontend: int
    slab: Slab
    slot: int
    observed: bool = True  # False: a front end's warm-up, which no metric counts


@dataclass
class Hosted:
    """A loaded version folder, its batcher, and which front ends hold it."""

    engine: Engine
    batcher: Batcher
    warmup_ms: float
    handle: int  # what submits and releases name it by
    version_dir: str
    digest: str | None  # of its manifest's bytes when it was loaded (None: unreadable then)
    # A set, not a count: a front end holds a folder or not, however often it acquired it
    # (it counts its own users and releases once); nothing to drift when one goes away.
    holders: set[int] = field(default_factory=set)
    unload: asyncio.TimerHandle | None = None


class HostedEngines:
    """The loaded version folders (``hosted``: by folder, the entry an acquire shares;
    ``handles``: by number, every entry, those of a folder replaced since included) and the
    front ends' requests to them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine_factory: EngineFactory) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory
        self.hosted: dict[str, Hosted] = {}
        self.handles: dict[int, Hosted] = {}
        self._next_handle = 0
        self._loading: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Long enough for any request pinned before a reload to reach the engine.
        self.unload_grace_s = settings.request_deadline_ms / 1e3 + 5.0

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Finish what every batcher holds (the process stops)."""
        await asyncio.gather(*(h.batcher.drain(self.settings.graceful_shutdown_s) for h in self.handles.values()))

    # ------------------------------------------------------------------ holds
    def acquire(self, frontend: FrontEnd, rid: int, version_dir: str) -> None:
        """Load (or share) ``version_dir`` for ``frontend``: answered ``acquired`` once loaded."""
        self._spawn(self._acquire(frontend, rid, version_dir))

    async def _acquire(self, frontend: FrontEnd, rid: int, version_dir: str) -> None:
        try:
            hosted = await self.load(version_dir)
        except Exception as exc:
            log.error("cannot load %s: %s", version_dir, exc)
            frontend.channel.send({"op": "error", "rid": rid, "message": f"{type(exc).__name__}: {exc}"})
            return
        if not frontend.connected:  # it left while this loaded: unload later unless taken
            self._unload_later_if_idle(hosted)
            return
        hosted.holders.add(frontend.ident)
        if hosted.unload is not None:
            hosted.unload.cancel()
            hosted.unload = None
        frontend.channel.send({"op": "acquired", "rid": rid, "name": hosted.engine.name, "handle": hosted.handle,
                               # Which content of the folder: a front end tells its entries apart by it.
                               "dir": version_dir, "digest": hosted.digest or "",
                               "max_batch_size": int(hosted.engine.max_batch_size),
                               "warmup_ms": hosted.warmup_ms,
                               # What runs, which a front end describes and decides with: also
                               # where the folder has left the store since (a pin serves on).
                               "manifest": hosted.engine.manifest.model_dump(mode="json")})

    async def load(self, version_dir: str) -> Hosted:
        """The entry that hosts what ``version_dir`` holds now: the one loaded before while its
        manifest is the same (or cannot be read: a pinned version whose folder left the store
        serves on from here), else a new one (the folder was replaced under its number)."""
        async with self._loading.setdefault(version_dir, asyncio.Lock()):
            hosted = self.hosted.get(version_dir)
            digest = await asyncio.to_thread(manifest_digest, version_dir)
            if hosted is not None and (digest is None or digest == hosted.digest):
                return hosted
            s = self.settings
            engine = await asyncio.to_thread(self._engine_factory, Path(version_dir), kind=s.engine, device=s.device,
                                             threads=s.intra_op_threads, max_batch_size=s.max_batch_size,
                                             tensorrt_cache_dir=s.ort_tensorrt_cache_dir,
                                             tensorrt_cache_max_bytes=s.ort_tensorrt_cache_max_bytes)
            warmup_ms = await asyncio.to_thread(warm_engine, engine, s.max_batch_size)
            category = engine.manifest.category
            batcher = Batcher(category, self._runner(category, engine), label=engine.name,
                              max_batch_size=max(1, min(s.max_batch_size, int(engine.max_batch_size))),
                              max_queue_delay_s=s.max_queue_delay_ms / 1e3,
                              # Each front end's request slots, and its warm-up slab's on top:
                              # a reload's warm-up is never refused for its requests' room.
                              max_queue_size=(s.max_queue_size + warmup_slots(s)) * max(1, s.api_processes),
                              observer=self.metrics,
                              lent_payloads=True)
            if not any(h.engine.manifest.category == category for h in self.handles.values()):
                # This process serves the category from now on: its queue depth is a series from
                # the start (0), not only after the first batch. A restarted engine process's
                # series had left /metrics with the process it replaces, and the autoscaler and
                # the dashboards read nothing until traffic came back.
                self.metrics.set_queue_depth(category, 0)
            self._next_handle += 1
            replaced = self.hosted.get(version_dir)
            hosted = self.hosted[version_dir] = Hosted(engine, batcher, warmup_ms, self._next_handle, version_dir,
                                                       digest)
            self.handles[hosted.handle] = hosted
            log.info("loaded %s on %s (warm-up %.0f ms)%s", version_dir, engine.name, warmup_ms,
                     "" if replaced is None else f": its folder replaced since handle {replaced.handle} was loaded")
            return hosted

    def release(self, ident: int, version_dir: str, handle: int | None = None) -> None:
        """``ident`` lets go of ``version_dir``'s entry ``handle`` (None: the one an acquire
        would share now)."""
        hosted = self.hosted.get(version_dir) if handle is None else self.handles.get(handle)
        if hosted is None or hosted.version_dir != version_dir or ident not in hosted.holders:
            return
        hosted.holders.discard(ident)
        self._unload_later_if_idle(hosted)

    def left(self, frontend: FrontEnd) -> None:
        """``frontend`` went away: its queued images are dropped (a running batch finishes
        into its slab), and what it held is released."""
        for batcher, futures in frontend.requests.values():
            batcher.cancel_queued(futures)
        for hosted in [h for h in self.handles.values() if frontend.ident in h.holders]:
            self.release(frontend.ident, hosted.version_dir, hosted.handle)

    def _unload_later_if_idle(self, hosted: Hosted) -> None:
        if not hosted.holders and hosted.unload is None:
            hosted.unload = asyncio.get_running_loop().call_later(self.unload_grace_s, self._unload, hosted.handle)

    def _unload(self, handle: int) -> None:
        hosted = self.handles.get(handle)
        if hosted is None or hosted.holders:
            return
        del self.handles[handle]
        if self.hosted.get(hosted.version_dir) is hosted:  # not a folder's content replaced since
            del self.hosted[hosted.version_dir]
        log.info("unloading %s (handle %d): no front end holds it", hosted.version_dir, handle)
        self._spawn(hosted.batcher.drain(self.settings.graceful_shutdown_s))

    def _runner(self, category: str, engine: Engine) -> Any:
        """The batcher's ``run_batch``: inputs from the slots, maps back into them."""
        run = engine_runner(engine)

        def run_batch(payloads: list[Payload]) -> list[float]:
            results = run([p.slab.input(p.slot) for p in payloads])
            for payload, (_, heat) in zip(payloads, results):
                payload.slab.output(payload.slot)[...] = heat
            fed = {p.frontend for p in payloads if p.observed}  # warm-ups feed no batch the metrics count
            if fed:
                self.metrics.batch_frontends.labels(category).observe(len(fed))
            return [score for score, _ in results]
        return run_batch

    # ------------------------------------------------------------------ requests
    def submit_or_fail(self, frontend: FrontEnd, submit: frames.Submit, observed: bool = True) -> None:
        """Queue a front end's request; ``observed=False``: a warm-up (see the module docstring)."""
        try:
            self._submit(frontend, submit, observed)
        except Exception as exc:  # one bad request must not end the process: its images fail
            log.exception("front end %d (pid %d): submit %d failed", frontend.ident, frontend.pid, submit.rid)
            failed = frames.Outcome(frames.ENGINE_ERROR, message=f"engine process: {type(exc).__name__}: {exc}")
            frontend.channel.send_frame(frames.pack_result(submit.rid, [failed] * len(submit.slots)))

    def _submit(self, frontend: FrontEnd, submit: frames.Submit, observed: bool) -> None:
        rid, slots, channel = submit.rid, submit.slots, frontend.channel

        def refuse(code: int) -> None:
            channel.send_frame(frames.pack_result(rid, [frames.Outcome(code)] * len(slots)))
        hosted = self.handles.get(submit.handle)
        if hosted is None:
            refuse(frames.NOT_LOADED)
            return
        if len(slots) == 1:  # one image per request, the common case: one callback, no list of outcomes
            self._submit_one(frontend, hosted, submit, observed, refuse)
            return
        slab = _slab_for(frontend, submit, hosted)
        payloads = [Payload(frontend.ident, slab, slot, observed) for slot in slots]
        futures = _enqueue(hosted, payloads, submit.deadline, observed, refuse)
        if futures is None:
            return
        frontend.requests[rid] = (hosted.batcher, futures)
        remaining = len(futures)

        def answer_when_all_done(_: asyncio.Future[Any]) -> None:  # one answer per request, no task
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                frontend.requests.pop(rid, None)
                channel.send_frame(frames.pack_result(rid, [_outcome(f) for f in futures]))
        for future in futures:
            future.add_done_callback(answer_when_all_done)

    @staticmethod
    def _submit_one(frontend: FrontEnd, hosted: Hosted, submit: frames.Submit, observed: bool,
                    refuse: Callable[[int], None]) -> None:
        """:meth:`_submit` of a request of one image, answered as it is (the same frames)."""
        rid, slot, channel = submit.rid, submit.slots[0], frontend.channel
        slab = _slab_for(frontend, submit, hosted)
        futures = _enqueue(hosted, (Payload(frontend.ident, slab, slot, observed),), submit.deadline, observed, refuse)
        if futures is None:
            return
        frontend.requests[rid] = (hosted.batcher, futures)

        def answer(future: asyncio.Future[Batched[float]]) -> None:
            frontend.requests.pop(rid, None)
            if future.cancelled() or future.exception() is not None:
                channel.send_frame(frames.pack_result(rid, [_outcome(future)]))
                return
            done = future.result()
            channel.send_frame(frames.pack_scored(rid, done.value, done.batch_size, done.queue_ms, done.run_ms))
        futures[0].add_done_callback(answer)

    @staticmethod
    def cancel(frontend: FrontEnd, rid: int) -> None:
        # Only what waits for a batch: the front end frees the slots on the answer, so an
        # image already running is answered when its batch is done writing into its slot.
        request = frontend.requests.get(rid)
        if request is not None:
            batcher, futures = request
            batcher.cancel_queued(futures)


def manifest_digest(version_dir: str) -> str | None:
    """A digest of ``version_dir``'s manifest's bytes (blocking), which differs once the folder
    holds another version; None when it cannot be read (a folder gone)."""
    try:
        return hashlib.sha256((Path(version_dir) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def _slab_for(frontend: FrontEnd, submit: frames.Submit, hosted: Hosted) -> Slab:
    """The slab ``submit`` names, checked before the batch, which every front end's images
    share and which must not fail for one bad request: each slot one of the slab's, and the
    slab of the engine's input size (inputs of another shape fail the whole batch's stack)."""
    slab = frontend.slabs[submit.slab]
    size = hosted.engine.manifest.input_size
    if slab.layout.size != size:
        raise ValueError(f"slab {slab.name} holds {slab.layout.size}x{slab.layout.size} inputs, "
                         f"{hosted.engine.manifest.category} takes {size}x{size}")
    for slot in submit.slots:
        slab.check_slot(slot)
    return slab


def _enqueue(hosted: Hosted, payloads: Sequence[Payload], deadline: float, observed: bool,
             refuse: Callable[[int], None]) -> list[asyncio.Future[Batched[float]]] | None:
    """The batcher's futures for ``payloads``; None once the request was refused (its queue
    full, or the version closing)."""
    try:
        return hosted.batcher.submit_many(payloads, deadline, observed)
    except QueueFull:
        refuse(frames.QUEUE_FULL)
    except BatcherClosed:
        refuse(frames.CLOSED)
    return None


def _outcome(future: asyncio.Future[Batched[float]]) -> frames.Outcome:
    if future.cancelled():
        return frames.Outcome(frames.CANCELLED)
    exc = future.exception()
    if exc is None:
        done = future.result()
        return frames.Outcome(frames.OK, done.value, done.batch_size, done.queue_ms, done.run_ms)
    if isinstance(exc, DeadlineExceeded):
        return frames.Outcome(frames.DEADLINE)
    if isinstance(exc, BatcherClosed):
        return frames.Outcome(frames.CLOSED)
    return frames.Outcome(frames.ENGINE_ERROR, message=f"{type(exc).__name__}: {exc}")
