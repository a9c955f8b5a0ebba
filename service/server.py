"""One uvicorn server process: the whole service, or one front end of a multi-process server
(:mod:`service.supervisor` starts those). Settings come from the environment; CLI flags win.

Shutdown on SIGTERM (Kubernetes, docker stop, systemd), in this order:

1. ``/readyz`` answers 503 at once, so load balancers stop sending new work;
2. after ``shutdown_delay_s`` (default 0) uvicorn stops accepting connections and waits up
   to ``graceful_shutdown_s`` for requests in flight; their images are already queued, so
   the batchers keep running them;
3. the app's lifespan drains every batcher (queued and running batches finish) and exits;
4. the metric values this process keeps in memory (multi-process mode) are written, and the
   process ends of the signal, as uvicorn has it (``_GracefulServer.capture_signals``).

A second SIGINT forces exit (uvicorn's behaviour); a second SIGTERM skips the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from service.allocator import keep_freed_memory
from service.api.app import create_app
from service.api.auth import access_summary
from service.api.connection_budget import ConnectionBudget
from service.api.connections import budgeted_protocol
from service.api.request_metrics import access_log
from service.config import Settings
from service.heap import freeze_startup_objects
from service.ipc.heartbeat import beat_forever
from service.metrics_buffer import flush as flush_metrics

log = logging.getLogger(__name__)


def build_settings(args: argparse.Namespace) -> Settings:
    """Environment settings with the CLI's non-None ``host``, ``port`` and ``store`` on top."""
    return Settings(**build_overrides(args))


class _GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT first turns readiness off; with ``beat`` (a
    front end), its event loop beats there for the supervisor's watch (service/ipc/heartbeat.py)."""

    def __init__(self, config: uvicorn.Config, on_signal: Any, delay_s: float,
                 beat: socket.socket | None = None) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._delay_s = delay_s
        self._signalled = False
        self._beat = beat

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        beating = asyncio.create_task(beat_forever(self._beat), name="heartbeat") if self._beat is not None else None
        try:
            await super().serve(sockets)
        finally:
            if beating is not None:
                beating.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Once shut down, uvicorn raises the signal it drained for again, with the handler it
        # found back in place: SIGTERM's default ends the process right there, and atexit
        # never runs. So the metric values a front end keeps in memory (service/metrics_buffer.py)
        # are written first; they were lost when no periodic flush came between a drained
        # front end's last requests and its end (18 of a burst's 24 counted).
        with super().capture_signals():
            try:
                yield
            finally:
                flush_metrics()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._delay_s <= 0:
            if not self._signalled:
                self._signalled = True
                self._on_signal()
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        self._on_signal()
        log.info("signal %d: readiness off, closing in %.1f s", sig, self._delay_s)
        # A timer thread only sets uvicorn's should_exit flag, which its main loop polls. Not
        # through handle_exit: for a SIGINT it forces the exit (no drain) once should_exit is
        # set, and Ctrl-C reaches every process of the group, then the supervisor's SIGTERM.
        timer = threading.Timer(self._delay_s, setattr, args=(self, "should_exit", True))
        timer.daemon = True
        timer.start()


def build_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's settings, for child processes (which read the environment themselves)."""
    return {field: getattr(args, arg) for arg, field in (("host", "host"), ("port", "port"), ("store", "model_store"))
            if getattr(args, arg, None) is not None}


class _UtcFormatter(logging.Formatter):
    """``%(asctime)s`` as ISO 8601 in UTC, to the millisecond: ``2026-12-06T18:26:00.123Z``."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def configure_access_log(settings: Settings) -> None:
    """The access log (``msflow.access``, written by service/api/request_metrics.py): with
    ``MSFLOW_ACCESS_LOG`` on, a line per request to stdout (where uvicorn's went), at INFO,
    so ``MSFLOW_LOG_LEVEL`` warning or above quiets it as it did uvicorn's; off, the logger is
    disabled and the middleware formats nothing."""
    access_log.handlers.clear()
    access_log.propagate = False
    access_log.disabled = not settings.access_log
    access_log.setLevel(settings.log_level.upper())
    if settings.access_log:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_UtcFormatter("%(asctime)s %(message)s"))
        access_log.addHandler(handler)


def run_server(settings: Settings, sockets: list[socket.socket] | None = None,
               beat: socket.socket | None = None) -> int:
    """One uvicorn server on this process: the whole service, or one front end of several
    (``sockets``: the listening socket the supervisor shares among them; ``beat``: where its
    loop says it runs)."""
    app = create_app(settings)
    # http: uvicorn's httptools protocol with the connections' budgets (service/api/connections.py);
    # ws: none, the API has no WebSocket route (an upgrade request is served as plain HTTP)
    http = budgeted_protocol(ConnectionBudget.from_settings(settings), app.state.service.metrics)
    # access_log=False: uvicorn's line (no time, no request id, none for a client gone) gives
    # way to the app's own, one per request (configure_access_log)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, lifespan="on", http=http, ws="none",
                            timeout_graceful_shutdown=settings.graceful_shutdown_s)  # type: ignore[arg-type]
    configure_access_log(settings)  # after uvicorn.Config, which configures logging
    server = _GracefulServer(config, app.state.service.begin_shutdown, settings.shutdown_delay_s, beat)
    keep_freed_memory(settings.heap_retain_mb << 20)
    log.debug("%d start-up objects frozen out of the collector's passes", freeze_startup_objects())
    if sockets is None:
        log.info("serving %s on http://%s:%d (engine %s, batch %d, delay %.1f ms; %s)", settings.model_store,
                 settings.host, settings.port, settings.engine, settings.max_batch_size, settings.max_queue_delay_ms,
                 access_summary(settings))
    server.run(sockets=sockets)
    return 0 if server.started else 1
