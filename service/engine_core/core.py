"""The engine process's core: it accepts front ends, reads their messages and hands each one
to what owns it (:mod:`~service.engine_core.hosting` for engines and images,
:mod:`~service.engine_core.relay` for what front ends ask of each other)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from pathlib import Path

from service.config import Settings
from service.engine_core.frontend import FrontEnd
from service.engine_core.hosting import Hosted, HostedEngines
from service.engine_core.relay import Gather, Relay
from service.engines.factory import load_engine
from service.heap import report_collector_pauses
from service.ipc import frames
from service.ipc.channel import Channel, Incoming, Message
from service.ipc.listener import accept_forever, listen_unix
from service.ipc.slab import Slab
from service.metrics import ServiceMetrics
from service.pipeline.loaded_model import EngineFactory
from service.pipeline.stall_watch import StallWatch

log = logging.getLogger(__name__)


class AcceptLoopDied(RuntimeError):
    """The task accepting front ends ended: this process could never serve a new one."""


class EngineCore:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None,
                 engine_factory: EngineFactory = load_engine) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.engines = HostedEngines(settings, self.metrics, engine_factory)
        self.frontends: dict[int, FrontEnd] = {}
        # The engines' CUDA context is this process's: a front end's scrape cannot read the GPU.
        self.relay = Relay(self.frontends, on_scrape=self.metrics.refresh_gpu_memory)
        self._next_ident = 0
        self._stopping = asyncio.Event()
        # A batch that never ends ends this process (service/pipeline/stall_watch.py).
        self.stall_watch = StallWatch(
            lambda: [(h.engine.manifest.category, h.batcher) for h in list(self.engines.handles.values())],
            settings.engine_stall_s)

    # What it holds, read by the tests and when debugging (each part's own table).
    @property
    def hosted(self) -> dict[str, Hosted]:
        return self.engines.hosted

    @property
    def unload_grace_s(self) -> float:
        return self.engines.unload_grace_s

    @unload_grace_s.setter
    def unload_grace_s(self, seconds: float) -> None:
        self.engines.unload_grace_s = seconds

    @property
    def reloads(self) -> dict[str, Message]:
        return self.relay.reloads

    @property
    def gathers(self) -> dict[int, Gather]:
        return self.relay.gathers

    # ------------------------------------------------------------------ serving
    async def serve(self, path: Path) -> None:
        """Accept front ends on ``path`` until :meth:`stop`; then drain every batcher.
        Raises :class:`AcceptLoopDied` if accepting front ends ends otherwise."""
        loop = asyncio.get_running_loop()
        # Before listening: the first front end to connect is greeted with the operator's reloads.
        self.relay.keep_at(path.with_name(f"{path.stem}-reloads.json"))
        listener = listen_unix(path)
        log.info("engine process %d listening on %s", os.getpid(), path)
        self.stall_watch.start()
        accept = loop.create_task(accept_forever(listener, self._accepted), name="accept-frontends")
        # Its pauses stall every front end's batches: they show on every front end's /metrics.
        collector_report = loop.create_task(report_collector_pauses(
            functools.partial(self.metrics.observe_gc_pauses, "engine")), name="gc-pauses")
        stopping = loop.create_task(self._stopping.wait())
        try:
            await asyncio.wait((stopping, accept), return_when=asyncio.FIRST_COMPLETED)
            if accept.done():
                # accept_forever outlives what the system refuses for a while; anything else
                # ending it leaves a process that would never take a front end again: this one
                # ends instead (a non-zero exit), and the supervisor starts a new one.
                cause = None if accept.cancelled() else accept.exception()
                log.critical("engine process: accepting front ends stopped (%r); exiting", cause)
                collector_report.cancel()
                raise AcceptLoopDied("accepting front ends stopped") from cause
        finally:
            accept.cancel()
            stopping.cancel()
            listener.close()
            path.unlink(missing_ok=True)
        self.stall_watch.stop()  # a drain that times out is the shutdown's to report
        await self.engines.drain()
        for frontend in list(self.frontends.values()):
            frontend.channel.close()
        collector_report.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector_report

    def stop(self) -> None:
        self._stopping.set()

    def _accepted(self, conn: socket.socket) -> None:
        self._next_ident += 1
        ident = self._next_ident
        channel = Channel(conn, asyncio.get_running_loop(), lambda batch, i=ident: self._on_messages(i, batch),
                          lambda i=ident: self._disconnected(i), name=f"frontend-{ident}")
        self.frontends[ident] = FrontEnd(ident, channel)
        channel.start()

    def _on_messages(self, ident: int, batch: list[tuple[Incoming, list[int]]]) -> None:
        frontend = self.frontends.get(ident)
        if frontend is None:
            for _, fds in batch:
                for fd in fds:
                    os.close(fd)
            return
        for message, fds in batch:
            if isinstance(message, bytes):
                self._handle_frame(frontend, message)
                continue
            try:
                self._handle(frontend, message, fds)
            except Exception:  # one bad message must not end the process: the front end gets an error
                log.exception("front end %d (pid %d): message %s failed", ident, frontend.pid, message.get("op"))
                if "rid" in message:
                    frontend.channel.send({"op": "error", "rid": message["rid"], "message": "engine process error"})
            finally:
                # What the message's handler did not take (only a slab that attached takes its
                # descriptor): a peer's stray descriptors must not stay open here for good.
                for fd in fds:
                    os.close(fd)

    def _handle_frame(self, frontend: FrontEnd, frame: bytes) -> None:
        try:
            kind = frame[0]
            if kind == frames.PART:
                self.relay.relay_part(frontend, frame)
                return
            if kind != frames.SUBMIT:
                raise ValueError(f"unknown frame kind {kind}")
            submit = frames.unpack_submit(frame)
        except frames.UNREADABLE:
            # A front end that sends garbage has a bug; the channel to it stays usable, and a
            # request whose id could not be read waits out its own deadline there.
            log.exception("front end %d (pid %d): unreadable frame", frontend.ident, frontend.pid)
            return
        self.engines.submit_or_fail(frontend, submit)

    def _handle(self, frontend: FrontEnd, message: Message, fds: list[int]) -> None:
        """One control message. ``fds``: its descriptors; a handler that keeps one takes it
        out of the list, the caller closes the rest."""
        op = message["op"]
        if op == "hello":
            frontend.pid = int(message["pid"])
            log.info("front end %d connected (pid %d)", frontend.ident, frontend.pid)
            self.relay.greet(frontend)
        elif op == "slab":
            if len(fds) != 1:
                raise ValueError(f"slab message with {len(fds)} descriptors, not 1")
            ident, size, slots = int(message["id"]), int(message["size"]), int(message["slots"])
            old = frontend.slabs.pop(ident, None)
            if old is not None:
                old.close()
            # Taken out of fds first: attach owns it from the call on (and closes it if it fails).
            frontend.slabs[ident] = Slab.attach(fds.pop(), size, slots, str(message["name"]))
        elif op == "drop_slab":  # its category retired, none of its slots in flight: unmapped once unread
            dropped = frontend.slabs.pop(int(message["id"]), None)
            if dropped is not None:
                dropped.close()
        elif op == "warm":  # a submit that is a warm-up: run and answered like one, observed by no metric
            submit = frames.Submit(int(message["rid"]), int(message["handle"]), int(message["slab"]),
                                   float(message["deadline"]), [int(slot) for slot in message["slots"]])
            self.engines.submit_or_fail(frontend, submit, observed=False)
        elif op == "acquire":
            self.engines.acquire(frontend, int(message["rid"]), str(message["dir"]))
        elif op == "release":
            handle = message.get("handle")  # absent: the folder's entry an acquire shares now
            self.engines.release(frontend.ident, str(message["dir"]), None if handle is None else int(handle))
        elif op == "cancel":
            self.engines.cancel(frontend, int(message["rid"]))
        elif op == "reload":
            self.relay.reload(frontend, message)
        elif op == "retired":
            self.relay.retire(frontend, message)
        elif op == "gather":
            self.relay.gather(frontend, int(message["rid"]), str(message["topic"]), dict(message.get("args") or {}))
        else:
            raise ValueError(f"unknown message {op!r}")

    def _disconnected(self, ident: int) -> None:
        frontend = self.frontends.pop(ident, None)
        if frontend is None:
            return
        frontend.connected = False
        log.warning("front end %d (pid %d) disconnected; dropping its queued images and holds",
                    ident, frontend.pid)
        self.engines.left(frontend)
        for slab in frontend.slabs.values():
            slab.close()
        frontend.slabs.clear()
        self.relay.left(frontend)
