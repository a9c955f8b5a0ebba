"""A front end's images through the engine process (multi-process mode): the requests in
flight on its shared-memory slabs (:mod:`~service.pipeline.engine_slabs`: a category's request
slots, ``max_queue_size`` of them, its queue budget in this front end, and its warm-up slots),
and their answers.

A request copies its inputs into its slots and costs one packed ``submit`` frame
(:mod:`service.ipc.frames`); the ``result`` frame resolves one future per image, whose map
is copied out of the slot before the slots are given back (never earlier: the engine process
may still be writing into them). A caller that gives up sends ``cancel``.

A request submitted with ``lend=True`` (the runtime's inspect path) gets its maps as views of
its slots instead: each answered image keeps its slot until :meth:`EngineImages.release`, which
the caller runs once every reader is done (the postprocess; a review capture takes a copy),
in a ``finally``. Saves copying 256 KB per image at 256² (docs/performance-log.md).

A warm-up (the registry's, at a front end's start and at each reload: :meth:`EngineImages.run`)
goes on its category's warm-up slots, never on its request slots, and waits for them while
another warm-up of the category holds them. Once the store watch retired a category
(:meth:`EngineImages.retire`), each answer or release that brings the last slot of one of
its slabs back frees that slab.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.config import Settings
from service.engines.base import EngineError
from service.ipc import frames
from service.ipc.channel import Channel
from service.ipc.slab import Slab, SlotPool
from service.pipeline.batch_queue import Batched, BatcherClosed, DeadlineExceeded, QueueFull
from service.pipeline.engine_errors import EngineUnavailable
from service.pipeline.engine_slabs import WARMUP, Entry, SlabKey, Slabs, WarmupKey, WarmupSlots, warmup_slots
from service.pipeline.holds import Hold

_WARMUP_DEADLINE_S = 300.0  # a warm-up batch through the engine process: first CUDA / TensorRT runs are slow


class Link(Protocol):
    """What the image path needs of the :class:`~service.pipeline.engine_client.EngineClient`
    (a protocol, not an import: the client module imports this one)."""

    channel: Channel | None
    handles: dict[Hold, int]

    @property
    def connected(self) -> bool: ...


@dataclass
class _Request:
    key: SlabKey
    slab: Slab
    pool: SlotPool
    slots: list[int]
    futures: list["_ImageFuture"]
    sent_at: float  # time.monotonic() at submit
    lend: bool  # answered maps are views of the slots, kept until released (see the module docstring)
    cancel_sent: bool = False


class _ImageFuture(asyncio.Future):  # type: ignore[type-arg]
    """One image's answer. Cancelling it (the caller's deadline, a client gone) tells the
    engine process to drop the request's images before the engine runs them: a hook on
    ``cancel`` itself, where a done-callback per image would cost a loop turn per answer."""

    def __init__(self, images: "EngineImages", rid: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._images = images
        self._rid = rid
        self.lent: tuple[SlotPool, int, str] | None = None  # the slot its result's map is a view of, its category

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._images.cancelled(self._rid)
        return True


class EngineImages:
    """``slabs``: the slabs by key (:class:`~service.pipeline.engine_slabs.Slabs`);
    ``requests``: request id -> what is in flight. ``ids``: the client's request ids (one
    space with its calls: an ``error`` answer names either)."""

    def __init__(self, settings: Settings, link: Link, ids: Iterator[int]) -> None:
        self.settings = settings
        self._link = link
        self._ids = ids
        self.loop: asyncio.AbstractEventLoop | None = None  # the client's, set when it starts
        self._slabs = Slabs(settings, link)
        self.requests: dict[int, _Request] = {}

    @property
    def slabs(self) -> dict[SlabKey, Entry]:
        """Key -> (slab id, slab, its free slots) (read by tests and when debugging)."""
        return self._slabs.table

    # ------------------------------------------------------------------ the connection's life
    def hand_over(self, channel: Channel) -> None:
        """A new connection: every slab to the engine process."""
        self._slabs.hand_over(channel)

    def lost(self, exc: EngineUnavailable, renew: bool) -> None:
        """The connection ended: every image in flight fails with ``exc``. ``renew``: a slab
        with slots in flight is replaced (the client reconnects)."""
        in_use: set[SlabKey] = set()
        for request in self.requests.values():
            for future in request.futures:
                if not future.done():
                    future.set_exception(exc)
            in_use.add(request.key)
            request.pool.give_back(request.slots)
        self.requests.clear()
        if renew:
            self._slabs.renew(in_use)
        for category in {key[0] for key in in_use} & self._slabs.retired:
            self._slabs.free_idle(category)

    def close(self) -> None:
        self._slabs.close()

    def retire(self, category: str) -> None:
        """The store watch retired ``category``: its slabs are freed, here and in the engine
        process, once none of their slots is in flight or lent (now, or as the last comes back)."""
        self._slabs.retire(category)

    # ------------------------------------------------------------------ requests
    def pool(self, category: str, size: int) -> SlotPool:
        """``category``'s request slots for inputs of ``size`` (a lane's: the category is
        served, so its slabs stay), made on their first use."""
        self._slabs.serve(category)
        return self._slabs.entry((category, size))[2]

    def submit(self, category: str, hold: Hold, tensors: Sequence[np.ndarray], deadline: float,
               lend: bool = False) -> list[asyncio.Future[Any]]:
        """Queue ``tensors`` (all or none) of ``category`` (its manifest's, which its folder is
        placed under) on the engine process's entry ``hold``, on that category's slots; one future per image.
        ``lend``: each answered map is a view of its slot, held until :meth:`release` of the
        futures (which the caller must reach on every path)."""
        handle, channel = self._route(hold)
        key = (category, int(tensors[0].shape[0]))
        ident, slab, pool = self._slabs.entry(key)  # made again for a request pinned before a retirement
        slots = pool.take(len(tensors))
        if slots is None:
            raise QueueFull(f"no room: {pool.free} of {pool.capacity} engine slots free, request has {len(tensors)}")
        futures, rid = self._queue(key, slab, pool, slots, tensors, lend)
        channel.send_frame(frames.pack_submit(rid, handle, ident, deadline, slots))
        return futures

    def _route(self, hold: Hold) -> tuple[int, Channel]:
        """The engine process's handle of ``hold`` and the channel to it."""
        link = self._link
        handle = link.handles.get(hold)
        channel = link.channel
        if not link.connected or handle is None or channel is None:
            raise EngineUnavailable("the engine process is restarting; retry")
        return handle, channel

    def _queue(self, key: SlabKey, slab: Slab, pool: SlotPool, slots: list[int], tensors: Sequence[np.ndarray],
               lend: bool) -> tuple[list[asyncio.Future[Any]], int]:
        """``tensors`` copied into their ``slots``, recorded in flight: the futures, the request id."""
        for tensor, slot in zip(tensors, slots):
            slab.input(slot)[...] = tensor
        rid = next(self._ids)
        loop = self.loop
        assert loop is not None, "EngineClient.start() not called"
        futures = [_ImageFuture(self, rid, loop) for _ in tensors]
        self.requests[rid] = _Request(key, slab, pool, slots, futures, time.monotonic(), lend)
        return futures, rid  # type: ignore[return-value]

    def in_flight_for(self, now: float) -> float:
        """How long the oldest request in flight has waited for its answer (0: none waits).
        Requests are kept in the order they were sent, and a caller past its deadline cancels,
        which the engine process answers at once unless the request's batch is running: one
        older than the deadline is stuck in a batch, or the engine process is not running."""
        for request in self.requests.values():
            return now - request.sent_at
        return 0.0

    def cancelled(self, rid: int) -> None:
        # The caller gave up (deadline, client gone): the engine drops the images before the
        # engine runs them and answers; the slots come back with that answer, not before,
        # since the engine process may be writing into them.
        request = self.requests.get(rid)
        channel = self._link.channel
        if request is not None and not request.cancel_sent and channel is not None:
            request.cancel_sent = True
            channel.send({"op": "cancel", "rid": rid})

    def resolve(self, rid: int, outcomes: list[frames.Outcome]) -> None:
        request = self.requests.pop(rid, None)
        if request is None:
            return
        pool, lend = request.pool, request.lend
        free: list[int] = []
        for future, slot, outcome in zip(request.futures, request.slots, outcomes):
            if future.done():  # the caller gave up (a cancel raced this answer): no one reads the map
                free.append(slot)
                continue
            if outcome.code == frames.OK:
                if lend:  # read in place: the slot comes back with release()
                    heat = request.slab.output(slot)
                    future.lent = (pool, slot, request.key[0])
                else:
                    heat = request.slab.output(slot).copy()  # the slot is reused once given back
                    free.append(slot)
                future.set_result(Batched((outcome.score, heat), outcome.batch_size, outcome.queue_ms,
                                          outcome.run_ms))
                continue
            free.append(slot)
            if outcome.code == frames.CANCELLED:
                future.cancel()  # the request is gone from requests: no cancel is sent back
            else:
                future.set_exception(_error(outcome.code, outcome.message))
        pool.give_back(free)
        if self._slabs.retired:
            self._slabs.free_idle(request.key[0])

    def release(self, futures: Sequence[asyncio.Future[Any]]) -> bool:
        """The caller of a ``lend`` submit is done with its results: each answered image's slot
        is given back (its map view must not be read again), and an unanswered one is cancelled,
        so no future of ``futures`` can lend a slot after this. Idempotent. True when a slot
        came back (the caller's maps were views of slots)."""
        released = False
        for future in futures:
            if not future.done():
                future.cancel()  # its slot comes back with the engine process's answer
                continue
            lent = getattr(future, "lent", None)
            if lent is not None:
                future.lent = None  # type: ignore[attr-defined]
                pool, slot, category = lent
                pool.give_back([slot])
                released = True
                if self._slabs.retired:
                    self._slabs.free_idle(category)
        return released

    def refused(self, rid: int, message: str) -> None:
        """An ``error`` answer that is no call's: a ``warm`` message the engine process could not read."""
        request = self.requests.get(rid)
        if request is not None:
            failed = frames.Outcome(frames.ENGINE_ERROR, message=f"engine process: {message}")
            self.resolve(rid, [failed] * len(request.slots))

    async def run(self, category: str, hold: Hold, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One whole batch through the engine process (the registry's warm-up), in parts no
        larger than this front end's warm-up slab, never on the slots of requests (see the
        module docstring). Not bound by the request deadline: a warm-up waits out the
        batching window and the engine's first (slowest) run, however short requests'
        deadlines are. Never observed by the metrics (sent as a ``warm`` control message, not
        a packed submit): one process warms outside its batcher, and counted here, every
        front-end start and reload added a batch of 8 images that no one inspected."""
        deadline = time.monotonic() + _WARMUP_DEADLINE_S
        self._slabs.serve(category)  # a version of it is loading: its slabs stay
        key: WarmupKey = (category, int(images.shape[1]), WARMUP)
        step = warmup_slots(self.settings)
        results: list[Batched[Any]] = []
        for start in range(0, len(images), step):
            part = list(images[start:start + step])
            # gather: when one image fails, the others' errors are read too (no "never retrieved")
            results += await asyncio.gather(*await self._warm(key, hold, part, deadline))
        return (np.array([r.value[0] for r in results], dtype=np.float32),
                np.stack([r.value[1] for r in results]))

    async def _warm(self, key: WarmupKey, hold: Hold, tensors: list[np.ndarray],
                    deadline: float) -> list[asyncio.Future[Any]]:
        """One part of a warm-up queued on its slab, once its slots are free."""
        while True:
            pool = self._slabs.entry(key)[2]
            assert isinstance(pool, WarmupSlots)
            slots = await pool.take_by(len(tensors), deadline)
            entry = self.slabs.get(key)
            if entry is not None and entry[2] is pool:
                break
            pool.give_back(slots)  # its slab was freed while this waited (the category retired): a new one
        try:
            handle, channel = self._route(hold)
        except BaseException:
            pool.give_back(slots)
            self._slabs.free_idle(key[0])
            raise
        ident, slab, _ = entry  # after the wait: a lost connection may have renewed the slab
        futures, rid = self._queue(key, slab, pool, slots, tensors, lend=False)
        channel.send({"op": "warm", "rid": rid, "handle": handle, "slab": ident, "deadline": deadline,
                      "slots": slots})
        return futures


def _error(code: int, message: str) -> Exception:
    if code == frames.QUEUE_FULL:
        return QueueFull("the engine process's queue is full")
    if code == frames.CLOSED:
        return BatcherClosed("the engine process is shutting down")
    if code == frames.DEADLINE:
        return DeadlineExceeded("deadline passed in the engine process's queue")
    if code == frames.NOT_LOADED:
        return EngineUnavailable("the engine process no longer holds this version; retry")
    return EngineError(message or "engine failed")
