"""A process's watch over the engines it runs: one that has run a batch for longer than
``MSFLOW_ENGINE_STALL_S`` ends the process, and whatever started it starts a new one.

A call that never returns (a wedged GPU, a driver deadlock) holds its engine thread for good:
every batch of that version waits behind it, every request gets 504 at its deadline (every job
fails at its TTL), and nothing in the process can take the thread back. Ending the process
can. The engine process of a multi-process server (:mod:`service.engine_core`): the supervisor
starts a new one, and the front ends, which answer 503 ``engine_unavailable`` meanwhile,
acquire their versions again (:mod:`service.pipeline.engine_client`). A worker
(:mod:`service.worker`): its orchestrator starts a new one, and the jobs it held are claimed
by the others. One server process instead fails its liveness probe (``/healthz``), since it
answers requests of other categories meanwhile.

The watch is a thread, not a task on the event loop, so that it still runs when the loop is
what is stuck; it reads each batcher's one attribute (``running_for``), nothing it must lock.
A busy engine never trips it: a batch that runs longer than the request deadline answers
nobody in time, and the limit is above the deadline (the settings refuse less).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable

from service.pipeline.batch_queue import BatchQueue

log = logging.getLogger(__name__)

EXIT_STALLED = 75  # EX_TEMPFAIL: started again, it serves
PERIOD_S = 1.0


def _exit_stalled(category: str, seconds: float) -> None:
    log.critical("the %s engine has run one batch for %.0f s (MSFLOW_ENGINE_STALL_S): a call that never "
                 "returns; exiting so that a new process takes over", category, seconds)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_STALLED)  # the engine thread never returns: no orderly shutdown can finish


class StallWatch:
    """Every ``period_s``, each of ``batchers()`` (category, batcher) is asked how long its
    batch has run; the first over ``limit_s`` is handed to ``on_stall`` (by default: the
    process exits), and the watch ends."""

    def __init__(self, batchers: Callable[[], Iterable[tuple[str, BatchQueue]]], limit_s: float,
                 on_stall: Callable[[str, float], None] = _exit_stalled, period_s: float = PERIOD_S) -> None:
        self._batchers = batchers
        self.limit_s = limit_s
        self._on_stall = on_stall
        self._period_s = period_s
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.limit_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="msflow-stall-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def stalled(self, now: float) -> tuple[str, float] | None:
        """The category whose batch has run longest past ``limit_s``, and how long; else None."""
        worst: tuple[str, float] | None = None
        try:
            running = [(category, batcher.running_for(now)) for category, batcher in self._batchers()]
        except RuntimeError:  # the table changed while read (a load, an unload): next period
            return None
        for category, seconds in running:
            if seconds > self.limit_s and (worst is None or seconds > worst[1]):
                worst = (category, seconds)
        return worst

    def _watch(self) -> None:
        while not self._stopped.wait(self._period_s):
            found = self.stalled(time.monotonic())
            if found is not None:
                self._on_stall(*found)
                return
