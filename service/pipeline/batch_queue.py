"""What a pipeline lane batches with, whichever queue it is: the contract (:class:`BatchQueue`)
kept by the local :class:`~service.pipeline.batcher.Batcher` and by a front end's
:class:`~service.pipeline.remote_batcher.RemoteBatcher` of the engine process's one; the
errors an item's future can carry (each answered by the API as its own status); an item's
result (:class:`Batched`); and the caller's side of a submission (:func:`submit_when_room`,
:func:`wait_results`), the same for both queues."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class BatcherError(RuntimeError):
    """Base of the errors an item's future can carry or ``submit`` can raise."""


class QueueFull(BatcherError):
    """The category's queue has no room for the request (answer 503 + Retry-After)."""


class BatcherClosed(BatcherError):
    """The batcher is draining for shutdown and takes no new work (answer 503)."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before it reached the engine (answer 504)."""


class CallerGone(BatcherError):
    """The caller stopped waiting (client disconnected); its items were cancelled."""


R = TypeVar("R")


class BatchQueue(Protocol):
    """What a pipeline lane batches with: a :class:`Batcher` here, or the front end's
    :class:`~service.pipeline.remote_batcher.RemoteBatcher` of the engine process's one."""

    category: str
    max_queue_delay_s: float

    @property
    def max_queue_size(self) -> int: ...

    @property
    def depth(self) -> int: ...

    @property
    def closing(self) -> bool: ...

    def check_room(self, count: int) -> None: ...

    def running_for(self, now: float) -> float:
        """How long the engine has been on this lane's oldest work it has not answered
        (``time.monotonic()`` seconds; 0 when none): what tells a stuck engine from a busy one."""
        ...

    def submit_many(self, items: Sequence[Any], deadline: float, *, lend: bool = False) -> list[asyncio.Future[Any]]:
        """One future per item. ``lend``: a result's value may be a view of memory the queue
        keeps for the caller until :meth:`release` (a front end's slots), which the caller
        then runs on every path once it has read the values."""
        ...

    def release(self, futures: Sequence[asyncio.Future[Any]]) -> bool:
        """The caller of a ``lend`` submit is done reading ``futures``' values (unfinished ones are
        cancelled). True when memory lent came back: the values' arrays must not be read again."""
        ...

    async def drain(self, timeout: float | None = None) -> None: ...


@dataclass(slots=True)
class Batched(Generic[R]):
    """One item's result, with the batch it ran in: ``value`` is what ``run_batch`` returned
    for it; ``queue_ms`` its wait, ``run_ms`` the whole batch's ``run_batch`` call.

    Made once per image on each side of the engine link (and in one process): not frozen,
    and made by position, since a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` and keywords are parsed per call (~10,000 instructions against
    ~2,600, counted by callgrind). Nothing changes one after it is made."""

    value: R
    batch_size: int
    queue_ms: float
    run_ms: float


async def submit_when_room(batcher: BatchQueue, items: Sequence[Any], deadline: float, *,
                           lend: bool = False) -> list[asyncio.Future[Any]]:
    """Queue ``items`` without ever being refused for a full queue (a worker, which already
    holds its jobs): in parts no larger than the queue, each once there is room for it (or
    :class:`DeadlineExceeded`). ``lend``: as :meth:`BatchQueue.submit_many`."""
    futures: list[asyncio.Future[Any]] = []
    step = batcher.max_queue_size
    try:
        for start in range(0, len(items), step):
            part = items[start:start + step]
            while batcher.depth + len(part) > batcher.max_queue_size:
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded("deadline passed while waiting for room in the queue")
                await asyncio.sleep(max(0.001, batcher.max_queue_delay_s))
            futures += batcher.submit_many(part, deadline, lend=lend)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return futures


async def wait_results(futures: Sequence[asyncio.Future[Any]], deadline: float,
                       gone: Awaitable[Any] | None = None) -> None:
    """Wait until every future is done, the ``time.monotonic()`` deadline passes
    (:class:`DeadlineExceeded`) or ``gone`` completes (:class:`CallerGone`).

    On the latter two the unfinished futures are cancelled, which is what makes the batcher
    drop those items before the engine. Results and per-item errors stay on the futures.
    """
    watcher = asyncio.ensure_future(gone) if gone is not None else None
    pending: set[asyncio.Future[Any]] = set(futures)
    try:
        while pending:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("deadline passed while waiting for the engine")
            waitables = pending | {watcher} if watcher is not None else pending
            done, _ = await asyncio.wait(waitables, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if watcher is not None and watcher in done:
                raise CallerGone("the caller went away")
            pending -= done
    finally:
        if watcher is not None:
            watcher.cancel()
        for f in futures:
            f.cancel()  # no-op on finished ones
