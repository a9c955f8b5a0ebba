"""Stopping the background tasks that call Redis (:func:`cancel_and_wait`), bounded.

A task cancelled while it sends a Redis command can miss the cancellation and go on: redis-py
bounds each write with ``asyncio.wait_for(..., socket_timeout)``, and Python 3.11's
``wait_for`` returns the inner result instead of raising when the cancellation arrives in
the loop iteration where its write has just completed (CPython gh-86296; 3.12's ``wait_for``
is built on ``asyncio.timeout`` and raises). The task then loops on: a threshold sync, a
heartbeat, a keep-alive, a probe. Measured with a private redis-server, a loop of ``MGET``
through :class:`~service.redisq.connection.RedisConnection` cancelled at each of the first
60 event-loop iterations, 5 times each: 42 of 300 cancellations were lost. Whoever then
awaited the task (``ThresholdOverrides.stop``'s ``gather``, so ``Worker.close`` and the API's
shutdown) waited forever, and a worker's heartbeat went on beating after the worker left.

So a task is cancelled again until it ends, and the wait is bounded: a task that still runs
after ``timeout_s`` is logged and left (a shutdown must end).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

# How long a cancelled task gets before it is cancelled again: a lost cancellation costs this.
RECANCEL_S = 0.05


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None], timeout_s: float = 5.0) -> bool:
    """Cancel ``tasks`` (None and finished ones skipped) and wait until every one has ended,
    cancelling again each still running every :data:`RECANCEL_S`, for at most ``timeout_s``.
    True if all ended; False (logged) if some still ran at the end. Their exceptions are
    retrieved (not raised): they are stopped, not awaited for a result."""
    pending = {task for task in tasks if task is not None and not task.done()}
    deadline = time.monotonic() + timeout_s
    ended: set[asyncio.Task[Any]] = set()
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.error("%d task(s) still running %.1f s after being cancelled: %s", len(pending), timeout_s,
                      ", ".join(sorted(task.get_name() for task in pending)))
            break
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_S, remaining))
        ended |= done
    for task in ended:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" at collection
    return not pending


__all__ = ["RECANCEL_S", "cancel_and_wait"]
