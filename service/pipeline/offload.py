"""Blocking calls off the event loop, at one wake-up of the loop per call.

``loop.run_in_executor`` over a ``ThreadPoolExecutor`` spends, per call, a
``concurrent.futures.Future`` (a ``Condition`` and its lock), the executor's locks and idle
semaphore, and a ``call_soon_threadsafe`` from the future's done callback; a pixel
:class:`~service.pipeline.admission.Ticket` following the call added a second one. Each
``call_soon_threadsafe`` writes to the loop's wake-up pipe, and on a virtual machine every
cross-thread wake-up is an interrupt sent to another vCPU. A request makes three of these
calls per image (probe, decode, postprocess), a batch one more, so they were a measurable
share of the front end's CPU (docs/performance-log.md).

Here a call is one put on a ``SimpleQueue`` and one ``call_soon_threadsafe`` back, which
settles the awaiting future and the ticket together. A call whose caller gave up before a
thread took it is skipped, as ``ThreadPoolExecutor`` skips a cancelled future.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from service.os_names import set_thread_name

_T = TypeVar("_T")


class CallTracker(Protocol):
    """What follows a call to its end in the thread, whatever its caller did meanwhile
    (:class:`~service.pipeline.admission.Ticket`: its pixels stay admitted until then)."""

    def call_started(self) -> None: ...

    def call_done(self) -> None: ...


class Offload:
    """``threads`` daemon threads named ``<name>_<i>`` (in Python and in the kernel:
    :mod:`service.os_names`) running blocking calls for coroutines."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("an offload needs at least one thread")
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=_work, args=(self._jobs,), name=f"{name}_{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    async def call(self, fn: Callable[..., _T], *args: Any, tracker: CallTracker | None = None) -> _T:
        """``fn(*args)`` in a thread. Cancelling the caller does not stop a call already
        running; ``tracker`` hears when it is over."""
        if self._closed:
            raise RuntimeError("the offload threads are closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        if tracker is not None:
            tracker.call_started()
        self._jobs.put((loop, future, fn, args, tracker))
        return await future

    def close(self, wait: bool = True) -> None:
        """No more calls; the threads exit after the calls already queued (joined if ``wait``)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


async def gather_in_order(calls: Sequence[Awaitable[_T]]) -> list[_T]:
    """Await ``calls`` together (several images' calls of one request); once all are over,
    raise the first failure in their order, else return their results. A single call is
    awaited as it is: ``asyncio.gather`` would wrap it in a task of its own, and one image
    per request is the common case (task creation was a tenth of the event loop's samples
    at the real engine's rate: docs/performance-log.md)."""
    if len(calls) == 1:
        return [await calls[0]]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]  # no exception among them


def _work(jobs: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    set_thread_name(threading.current_thread().name)  # top -H and the front-end benchmark see it
    while (job := jobs.get()) is not None:
        loop, future, fn, args, tracker = job
        result = error = None
        if not future.cancelled():  # a plain read of the future's state: at worst the work is done for nothing
            try:
                result = fn(*args)
            except BaseException as exc:  # delivered to the caller, as run_in_executor does
                error = exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error, tracker)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
        del job, future, fn, args, tracker, result, error  # an idle thread holds no request's pixels


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None, tracker: CallTracker | None) -> None:
    if tracker is not None:
        tracker.call_done()
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
