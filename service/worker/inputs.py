"""The worker's budget for job inputs in memory (:class:`InputBudget`): the bytes of the jobs'
images it has fetched from Redis and not yet run, against ``worker_max_input_bytes``.

Why: one read hands a worker up to ``max_batch_size`` jobs per category, each of up to
``max_request_bytes`` (64 MiB), and fetching all their images at once held 512 MiB at the
defaults (for every category consumed) before the pixel budget looked at any of them; a
worker sized for its usual jobs was killed by a read of large ones, and with it every job of
that read. Now a job's bytes (known before its fetch: the queue's accounting of them,
:meth:`~service.redisq.records.JobRecords.peek`) are taken from this budget first, so a read of
many large jobs fetches them in turn while the rest wait, in hand and kept alive.

First come, first served: a job waits behind any job that came before it, so a large job is
not overtaken for good by small ones. One job larger than the whole budget still runs, alone
(the budget bounds what is held beside it; the API's ``max_request_bytes`` bounds the job).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence


class InputBudget:
    """Bytes of fetched job inputs held at once (asyncio, one event loop). ``observe`` is
    told every new value of :attr:`held` (the worker's ``msflow_worker_input_bytes`` gauge)."""

    def __init__(self, limit: int, observe: Callable[[float], None] | None = None) -> None:
        self.limit = limit
        self._observe = observe
        self._held = 0
        self.held = 0
        self.peak = 0  # the most ever held at once (tests and the figures of docs/PERFORMANCE.md)
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def held(self) -> int:
        return self._held

    @held.setter
    def held(self, value: int) -> None:
        self._held = value
        if self._observe is not None:
            self._observe(value)

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    async def take(self, sizes: Sequence[int]) -> int:
        """Take room for the first ``sizes`` (waiting for it, after whoever waits already) and
        for as many of the next as fit beside it when nobody else waits; how many were taken
        (at least one). Each taken size must be given back (:meth:`give`)."""
        first = sizes[0]
        if self._waiting or not self._fits(first):
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (first, granted)
            self._waiting.append(entry)
            try:
                await granted  # _wake took the room for us: nobody can slip in between
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self.give(first)  # granted just before the cancellation: hand it on
                else:
                    self._waiting.remove(entry)
                    self._wake()  # it may have held back those behind it
                raise
        else:
            self.held += first
        taken = 1
        while taken < len(sizes) and not self._waiting and self.held + sizes[taken] <= self.limit:
            self.held += sizes[taken]
            taken += 1
        self.peak = max(self.peak, self.held)
        return taken

    def adjust(self, taken: int, actual: int) -> None:
        """The bytes fetched were ``actual``, not the ``taken`` expected (a job whose size the
        queue did not know was taken as the whole budget)."""
        self.held += actual - taken
        self.peak = max(self.peak, self.held)
        self._wake()

    def give(self, size: int) -> None:
        self.held -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, granted = self._waiting.popleft()
            if not granted.done():
                self.held += size
                granted.set_result(None)


__all__ = ["InputBudget"]
