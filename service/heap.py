"""The cycle collector and what a server process holds from its start.

CPython frees most objects by reference counting; its collector exists for reference cycles,
and its full pass (generation 2) walks every container object the process holds. A server
process holds ~120,000 from its imports alone (functions, classes, module dicts of the web
stack, the pipeline, numpy, SciPy, Pillow), none of which can ever become garbage. Under
load that pass came every 8-10 s and walked them all for ~100 ms (when `msflow serve` still
imported torch), holding the GIL: every request in flight stood still for it (p99.9 latency
135 ms against a p99 of 20 ms; docs/performance-log.md, "A tenth box").

:func:`freeze_startup_objects` moves what start-up made into the collector's permanent
generation, which no pass walks (``gc.freeze``). What the process makes later (engines,
lanes, requests) is collected as before, so a version unloaded on reload is freed as it was.

:data:`COLLECTOR_PAUSES` times every pass, so that operators see such stalls
(``msflow_gc_pause_seconds``) instead of finding them in a latency tail. A pass may start
in any thread, inside any call, a metric's own ``observe`` included, and prometheus-client's
locks are not reentrant: so the collector's callback only appends to a bounded deque (one
atomic operation, no lock), and the event loop hands what it holds to the metrics once a
second (:func:`report_collector_pauses`).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

Pass = tuple[int, float]  # (generation, seconds the pass took)


def freeze_startup_objects() -> int:
    """Call once, after the imports and before serving; returns how many objects were frozen."""
    gc.collect()  # start-up's own garbage is freed, not kept forever
    gc.freeze()
    return gc.get_freeze_count()


class CollectorPauses:
    """The collector's passes in this process since the last :meth:`drain`.

    At most ``capacity`` are kept, the oldest going first: a server made 15-40 passes a
    second under load (docs/performance-log.md), so the default holds minutes of them, far more
    than a loop that drains every second ever leaves."""

    def __init__(self, capacity: int = 4096) -> None:
        self._passes: collections.deque[Pass] = collections.deque(maxlen=capacity)
        self._started = 0.0

    def install(self) -> None:
        """Start timing passes (once per process; calling again changes nothing)."""
        if self._on_pass not in gc.callbacks:
            gc.callbacks.append(self._on_pass)

    def uninstall(self) -> None:
        if self._on_pass in gc.callbacks:
            gc.callbacks.remove(self._on_pass)

    def _on_pass(self, phase: str, info: dict[str, Any]) -> None:
        # Passes never overlap (the collector does not run while it runs), so one start time does.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._passes.append((int(info["generation"]), time.perf_counter() - self._started))

    def drain(self) -> list[Pass]:
        """The passes recorded so far, oldest first; they are forgotten here."""
        passes: list[Pass] = []
        while True:
            try:
                passes.append(self._passes.popleft())
            except IndexError:
                return passes


COLLECTOR_PAUSES = CollectorPauses()


async def report_collector_pauses(observe: Callable[[Sequence[Pass]], None], every_s: float = 1.0,
                                  pauses: CollectorPauses = COLLECTOR_PAUSES) -> None:
    """Time this process's passes and hand them to ``observe`` every ``every_s``, from the
    event loop (never from the collector's callback), until cancelled."""
    pauses.install()
    try:
        while True:
            await asyncio.sleep(every_s)
            passes = pauses.drain()
            if passes:
                observe(passes)
    finally:
        passes = pauses.drain()  # what came since the last report is not lost at shutdown
        if passes:
            observe(passes)
