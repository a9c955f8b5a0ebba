"""A lane's batcher in a front end of a multi-process server (:mod:`service.pipeline.engine_client`).

It forms no batch: the engine process does, across all front ends. It admits against this
front end's shared-memory slots (its queue budget) and hands the images to the
:class:`~service.pipeline.engine_client.EngineClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.metrics import ServiceMetrics
from service.pipeline.batch_queue import BatcherClosed, QueueFull
from service.pipeline.engine_client import EngineClient, EngineUnavailable, RemoteEngine


class RemoteBatcher:
    """A lane's batcher in a front end: admission against this front end's slots, then the
    engine process's batcher (``check_room``/``submit_many``/``drain`` as the local one)."""

    def __init__(self, client: EngineClient, engine: RemoteEngine, max_queue_delay_s: float,
                 metrics: ServiceMetrics) -> None:
        self.client = client
        self.category = engine.manifest.category
        self.label = engine.name
        self.hold = engine.hold  # the engine process's entry its images go to
        self.max_queue_delay_s = max_queue_delay_s
        self._metrics = metrics
        # The category's own slots, not its input size's: a neighbour's flood cannot take them.
        self._pool = client.pool(self.category, engine.manifest.input_size)
        self._closing = False
        # What drain waits for. Pruned of answered futures as it grows, not by a done-callback
        # per image (a loop turn per answer).
        self._in_flight: list[asyncio.Future[Any]] = []

    @property
    def max_queue_size(self) -> int:
        return self._pool.capacity

    @property
    def depth(self) -> int:
        return self._pool.capacity - self._pool.free

    @property
    def closing(self) -> bool:
        return self._closing

    def running_for(self, now: float) -> float:
        """How long this front end's oldest request has waited for the engine process's answer
        (every lane's: the engine process runs them all, and one stuck there holds them all)."""
        return self.client.images.in_flight_for(now)

    def check_room(self, count: int) -> None:
        if self._closing:
            self._metrics.count_rejection(self.category, "shutting_down")
            raise BatcherClosed(f"{self.category}: shutting down, not accepting new work")
        if not self.client.connected:
            self._metrics.count_rejection(self.category, "engine_unavailable")
            raise EngineUnavailable("the engine process is restarting; retry")
        if self._pool.free < count:
            self._metrics.count_rejection(self.category, "queue_full")
            raise QueueFull(f"{self.category}: queue full ({self.depth} of {self.max_queue_size} images in "
                            f"flight from this process, request has {count})")

    def submit_many(self, items: Sequence[np.ndarray], deadline: float, *,
                    lend: bool = False) -> list[asyncio.Future[Any]]:
        """``lend``: the maps are read in their slots, held until :meth:`release`
        (:meth:`~service.pipeline.engine_images.EngineImages.submit`)."""
        self.check_room(len(items))
        futures = self.client.submit(self.category, self.hold, items, deadline, lend=lend)
        if len(self._in_flight) >= 2 * self._pool.capacity:  # so each image is scanned about once
            self._in_flight = [f for f in self._in_flight if not f.done()]
        self._in_flight += futures
        return futures

    def release(self, futures: Sequence[asyncio.Future[Any]]) -> bool:
        """Give back the slots a ``lend`` submit's answered maps are read in (once every reader is
        done); True when one came back, i.e. the maps were views of slots, not to be read again."""
        return self.client.images.release(futures)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; wait for what this lane has in flight (the engine finishes it)."""
        self._closing = True
        pending = [f for f in self._in_flight if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
