"""Dynamic batching: many concurrent submissions -> few calls of one blocking ``run_batch``.

The batcher is generic, in the manner of Ray Serve's ``_BatchQueue``: it takes a blocking
``run_batch(items) -> results`` callable (one result per item, in order) and knows nothing
of engines, manifests or images. The runtime (:mod:`service.pipeline.runtime`) makes one
batcher per *loaded model version*, whose ``run_batch`` stacks the images and calls that
version's engine; a reload gives the new version a new batcher and drains the old one.

The split follows Ray Serve's ``@serve.batch`` and vLLM's scheduler/runner: the event loop
only *schedules* (queue, deadlines, cancellation, batch formation); the blocking engine call
runs on a dedicated single-thread executor, so the loop keeps accepting and decoding while
the accelerator works, and one engine never sees two callers at once.

Rules, each for a reason:

* The queue is bounded (``max_queue_size`` images). A full queue raises :class:`QueueFull`
  at once (the API answers 503 + Retry-After): an overloaded line must shed load, not
  build up a backlog whose answers arrive after the part has left the station.
* A batch is whatever is waiting, up to ``max_batch_size``, once ``max_queue_delay`` has
  passed since its *first* item was enqueued (or at once when full). If the engine was
  busy that long already, the batch leaves immediately: waiting adds latency for nothing.
* Items whose deadline passed, or whose caller went away (future cancelled), are dropped
  at batch formation, *before* the engine: nobody would read those answers.
* :meth:`Batcher.drain` stops new work, then finishes everything queued and running;
  a forming batch leaves without waiting for its delay.
* With ``lent_payloads`` (the engine process: a payload is a front end's shared-memory
  slot, which the front end reuses once the item is answered), an item of the running batch
  is answered only after ``run_batch`` has returned, whatever happens meanwhile:
  :meth:`Batcher.cancel_queued` leaves it to its batch, and a drain that times out fails
  only the queued items.
* Items submitted with ``observed=False`` (a warm-up: the engine process runs each front
  end's warm-up batch through the shared batcher) run like any other but are never
  observed: no queue wait, batch size, engine time nor rejection of theirs reaches the
  metrics, and a batch of warm-ups alone is not a batch there at all. The metrics describe
  the traffic; one process warms its engine outside its batcher, and the engine process's
  warm-ups counted 8 images a front-end start and reload with no inspection at all.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.engines.base import Engine
from service.os_names import engine_thread_name
from service.pipeline.batch_queue import Batched, BatcherClosed, DeadlineExceeded, QueueFull
from service.pipeline.offload import Offload

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Metrics hooks; :class:`service.metrics.ServiceMetrics` implements them."""

    def observe_batch(self, category: str, engine: str, size: int, engine_s: float) -> None: ...

    def observe_queue_wait(self, category: str, wait_s: float) -> None: ...

    def set_queue_depth(self, category: str, depth: int) -> None: ...

    def count_rejection(self, category: str, reason: str) -> None: ...


class _NullObserver:
    def observe_batch(self, category: str, engine: str, size: int, engine_s: float) -> None:
        pass

    def observe_queue_wait(self, category: str, wait_s: float) -> None:
        pass

    def set_queue_depth(self, category: str, depth: int) -> None:
        pass

    def count_rejection(self, category: str, reason: str) -> None:
        pass


@dataclass(slots=True)
class _Item:
    payload: Any
    deadline: float  # time.monotonic() seconds
    enqueued: float
    future: asyncio.Future[Batched[Any]]
    observed: bool = True  # False: a warm-up, which no metric counts


class Batcher:
    """A bounded batching queue in front of one blocking ``run_batch`` callable.

    ``category`` and ``label`` only name the metrics (the runtime passes the category and the
    engine's name). Create and use a batcher from inside a running event loop.
    """

    def __init__(self, category: str, run_batch: Callable[[list[Any]], Sequence[Any]], *, label: str = "",
                 max_batch_size: int = 8, max_queue_delay_s: float = 0.005, max_queue_size: int = 64,
                 observer: BatchObserver | None = None, lent_payloads: bool = False) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        self.category = category
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._run_batch = run_batch
        self.label = label
        self._observer: BatchObserver = observer or _NullObserver()
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._running: list[_Item] = []
        self._running_since: float | None = None  # when run_batch was called for the running batch
        self._lent_payloads = lent_payloads
        self._window_over = False  # the forming batch's delay has passed (its timer fired)
        # One thread: ``run_batch`` has one caller at a time (the engine contract), and batches
        # of one category are serial on the accelerator anyway.
        self._engine_thread = Offload(1, engine_thread_name(category))
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{category}")
        self._worker.add_done_callback(self._worker_done)

    # ------------------------------------------------------------------ submission
    @property
    def depth(self) -> int:
        """Images waiting for a batch (not counting the one running)."""
        return len(self._pending)

    @property
    def closing(self) -> bool:
        return self._closing

    def submit_many(self, items: Sequence[Any], deadline: float,
                    observed: bool = True, *, lend: bool = False) -> list[asyncio.Future[Batched[Any]]]:
        """Queue ``items`` (all or none) and return one future per item, in order.

        ``deadline`` is a ``time.monotonic()`` instant. Raises :class:`QueueFull` or
        :class:`BatcherClosed` synchronously, so nothing is queued for a rejected request.
        ``observed=False``: a warm-up, run like the others and left out of every metric.
        ``lend`` changes nothing here: the values are ``run_batch``'s own, nothing is lent.
        """
        self.check_room(len(items), observed)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        was_idle = not self._pending
        futures: list[asyncio.Future[Batched[Any]]] = []
        for payload in items:
            item = _Item(payload, deadline, now, loop.create_future(), observed)  # by position: no keyword parsing per image
            self._pending.append(item)
            futures.append(item.future)
        self._observer.set_queue_depth(self.category, len(self._pending))
        # The worker needs waking for a first item or a full batch only: while a batch waits
        # for company, each arrival would otherwise wake it just to count again.
        if was_idle or len(self._pending) >= self.max_batch_size:
            self._wakeup.set()
        return futures

    def release(self, futures: Sequence[asyncio.Future[Any]]) -> bool:
        """Nothing was lent (see :meth:`submit_many`); unfinished futures are cancelled, as a
        front end's release does."""
        for future in futures:
            future.cancel()  # a no-op on finished ones
        return False

    def running_for(self, now: float) -> float:
        """How long ``run_batch`` has been running the current batch (0 when none runs). Read
        from other threads too (the engine process's stall watch): one attribute, read once."""
        since = self._running_since
        return 0.0 if since is None else now - since

    def check_room(self, count: int, observed: bool = True) -> None:
        """Raise what :meth:`submit_many` would for ``count`` items now (:class:`QueueFull`,
        :class:`BatcherClosed`), without queuing anything: the runtime asks before it spends
        CPU and memory decoding a request the queue would refuse anyway."""
        if self._closing:
            if observed:
                self._observer.count_rejection(self.category, "shutting_down")
            raise BatcherClosed(f"{self.category}: shutting down, not accepting new work")
        if len(self._pending) + count > self.max_queue_size:
            self._purge_cancelled()
            if len(self._pending) + count > self.max_queue_size:
                if observed:
                    self._observer.count_rejection(self.category, "queue_full")
                raise QueueFull(f"{self.category}: queue full ({len(self._pending)} of {self.max_queue_size} "
                                f"images waiting, request has {count})")

    async def submit(self, item: Any, deadline: float) -> Batched[Any]:
        """Queue one item and wait for its result."""
        (future,) = self.submit_many([item], deadline)
        return await future

    def cancel_queued(self, futures: Iterable[asyncio.Future[Any]]) -> None:
        """Cancel those of ``futures`` whose items still wait for a batch. An item of the
        running batch is answered when that batch ends: ``run_batch`` may be reading or
        writing its payload until then (see ``lent_payloads``)."""
        running = {id(item.future) for item in self._running}
        for future in futures:
            if id(future) not in running:
                future.cancel()

    def _purge_cancelled(self) -> None:
        # Callers that went away still hold slots until their batch forms; free them when the
        # slots are needed.
        kept = [item for item in self._pending if not item.future.done()]
        if len(kept) != len(self._pending):
            self._pending = collections.deque(kept)

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_company(self.max_batch_size)
            live = self._admit(self._take(self.max_batch_size))
            if live:
                self._running = live
                try:
                    await self._execute(live)
                finally:
                    self._running = []
                    self._running_since = None
            # Not kept while the worker waits: its payloads may be views of a front end's slab
            # (the engine process), which a retired category's drop_slab unmaps once unread.
            del live

    def _take(self, n: int) -> list[_Item]:
        batch = [self._pending.popleft() for _ in range(min(n, len(self._pending)))]
        self._observer.set_queue_depth(self.category, len(self._pending))
        return batch

    async def _wait_for_company(self, limit: int) -> None:
        """Wait until the batch is full, the delay since the first item passed, or draining."""
        window_end = self._pending[0].enqueued + self.max_queue_delay_s
        loop = asyncio.get_running_loop()
        while len(self._pending) < limit and not self._closing:
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            # A timer that wakes the worker, not asyncio.timeout: most small batches leave when
            # their window ends, and a timeout ends its wait by cancelling the task, an exception
            # raised, caught and converted each time (no task per wait either, unlike wait_for).
            self._window_over = False
            timer = loop.call_later(remaining, self._end_window)
            try:
                await self._wakeup.wait()
            finally:
                timer.cancel()
            if self._window_over:
                return

    def _end_window(self) -> None:
        self._window_over = True
        self._wakeup.set()

    def _admit(self, batch: list[_Item]) -> list[_Item]:
        """Drop what nobody will read: cancelled items, and items past their deadline."""
        now = time.monotonic()
        live: list[_Item] = []
        for item in batch:
            if item.future.done():  # cancelled: the client disconnected or gave up
                if item.observed:
                    self._observer.count_rejection(self.category, "cancelled")
            elif now >= item.deadline:
                if item.observed:
                    self._observer.count_rejection(self.category, "deadline")
                item.future.set_exception(DeadlineExceeded(
                    f"{self.category}: deadline passed after {(now - item.enqueued) * 1e3:.0f} ms in the queue"))
            else:
                live.append(item)
        return live

    async def _execute(self, items: list[_Item]) -> None:
        started = self._running_since = time.monotonic()
        observed = 0
        for item in items:
            if item.observed:
                observed += 1
                self._observer.observe_queue_wait(self.category, started - item.enqueued)
        try:
            results = await self._engine_thread.call(self._run_batch, [item.payload for item in items])
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for a batch of {len(items)}")
        except Exception as exc:  # one bad batch must not stop the worker
            log.exception("%s: %s failed on a batch of %d", self.category, self.label or "run_batch", len(items))
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        run_s = time.monotonic() - started
        if observed:  # the batch as the traffic made it: warm-ups riding along are not counted
            self._observer.observe_batch(self.category, self.label, observed, run_s)
        size, run_ms = len(items), run_s * 1e3
        for item, value in zip(items, results):
            if not item.future.done():  # cancelled while running: the answer is simply dropped
                item.future.set_result(Batched(value, size, (started - item.enqueued) * 1e3, run_ms))

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Should never happen (every batch error is caught); if it does, say so loudly and
            # stop accepting, instead of letting requests hang on a dead worker.
            log.critical("%s: batch worker died", self.category, exc_info=task.exception())
            self._closing = True
            for item in [*self._running, *self._pending]:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed(f"{self.category}: batch worker failed"))
            self._pending.clear()

    # ------------------------------------------------------------------ shutdown
    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, finish queued and running batches, release the run_batch thread.

        With ``timeout``, whatever is still unfinished after it is failed with
        :class:`BatcherClosed` instead of hanging shutdown forever (with ``lent_payloads``,
        the running batch's items are left to be answered when its run_batch returns).
        """
        self._closing = True
        self._wakeup.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._worker)
        except TimeoutError:
            log.error("%s: drain timed out after %.1f s; failing %d queued images",
                      self.category, timeout, len(self._pending))
            if self._lent_payloads:
                # The worker answers the running batch once run_batch returns, then stops
                # (nothing is queued any more); until then its payloads are still in use.
                unfinished = list(self._pending)
            else:
                self._worker.cancel()
                unfinished = [*self._running, *self._pending]
            for item in unfinished:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed(f"{self.category}: shut down before finishing"))
            self._pending.clear()
        finally:
            self._engine_thread.close(wait=False)
            self._observer.set_queue_depth(self.category, 0)

    async def close(self) -> None:
        """Alias of :meth:`drain` without a timeout."""
        await self.drain()


def engine_runner(engine: Engine) -> Callable[[list[np.ndarray]], list[tuple[float, np.ndarray]]]:
    """The ``run_batch`` of an engine's batcher: stack, run, split per image (here, and in the
    engine process of a multi-process server, around its shared-memory slots)."""
    def run_batch(tensors: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        # A batch of one is its image seen as a batch, not a copy of it: at the engine process's
        # usual 1-2 images a batch, np.stack copied each input out of its slot (196 KB at 256²).
        batch = tensors[0][np.newaxis] if len(tensors) == 1 else np.stack(tensors)
        scores, maps = engine.run(batch)
        if len(scores) != len(tensors) or len(maps) != len(tensors):
            raise RuntimeError(f"engine {engine.name} returned {len(scores)} scores / {len(maps)} maps "
                               f"for a batch of {len(tensors)}")
        return [(float(s), m) for s, m in zip(scores, maps)]
    return run_batch
