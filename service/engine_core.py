"""The engine process of a multi-process server: every engine, and the one place batches form.

``msflow serve`` with ``MSFLOW_API_PROCESSES`` = N > 1 runs N front-end processes (HTTP,
decode, postprocess; :mod:`service.server`) and this one process per device, the split vLLM
makes between its API server and its ``EngineCore``. Front ends connect over a Unix socket
(:mod:`service.ipc.channel`) and hand over a shared-memory slab per input size
(:mod:`service.ipc.slab`); a request then costs two small packed frames
(:mod:`service.ipc.frames`):

``submit (rid, handle, slab, deadline, slots)``  ->  one :class:`~service.pipeline.batcher.Batcher`
per loaded version folder (``handle``: its number, given on ``acquire``), shared by every
front end, so the batches fill from all of them (``msflow_batch_frontends`` counts how many
fed each batch) -> the engine reads the inputs from the slots and writes the maps into them
-> ``result (rid, outcomes)``.

The engine process also relays what front ends ask of each other: an operator's ``reload``
(every other front end follows it), and a ``gather`` (an admin's view of what every front
end holds: the recent scores of :mod:`service.pipeline.recent`): it asks every other front
end (``collect``), relays their ``part`` frames to the front end that asked as they come,
unparsed, and ends with ``gathered`` once all answered, or after :data:`GATHER_TIMEOUT_S`
with those that did (a stopped front end must not hang an admin's page).

A front end's warm-up of a version (the registry's, through the whole path) is the same
request sent as a ``warm`` control message: it runs in the same batcher and is answered the
same way, but is never observed (batch size, engine time, queue wait, front ends per batch,
rejections), so that the metrics count inspections only, as in one process.

Engines are loaded on a front end's ``acquire`` of a version folder (its registry decides
what is served; the first acquire loads and warms, the others share) and unloaded a grace
period after the last front end released it, so that a front end restarting, or a request
pinned to the old version just before a reload, still finds it. A front end that goes away
(crash included) releases what it held and its queued images are dropped; its slabs are
unmapped once the last batch that reads them is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from service.allocator import keep_freed_memory
from service.config import Settings
from service.engines.base import Engine
from service.engines.factory import load_engine
from service.heap import freeze_startup_objects, report_collector_pauses
from service.ipc import frames
from service.ipc.channel import Channel, Incoming, Message
from service.ipc.listener import accept_forever, listen_unix
from service.ipc.slab import Slab
from service.metrics import ServiceMetrics
from service.pipeline.batcher import Batched, Batcher, BatcherClosed, DeadlineExceeded, QueueFull
from service.pipeline.registry import EngineFactory, warm_engine
from service.pipeline.runtime import engine_runner

log = logging.getLogger(__name__)


class AcceptLoopDied(RuntimeError):
    """The task accepting front ends ended: this process could never serve a new one."""


@dataclass
class Payload:
    """One image of a batch: where its input lies and where its map goes."""

    frontend: int
    slab: Slab
    slot: int
    observed: bool = True  # False: a front end's warm-up, which no metric counts


@dataclass
class Hosted:
    """A loaded version folder, its batcher, and which front ends hold it."""

    engine: Engine
    batcher: Batcher
    warmup_ms: float
    handle: int  # what submits name it by
    # A set, not a count: a front end holds a folder or not, however often it acquired it
    # (it counts its own users and releases once); nothing to drift when one goes away.
    holders: set[int] = field(default_factory=set)
    unload: asyncio.TimerHandle | None = None


# How long a gather waits for the front ends' answers (each is a copy of memory it holds,
# made on its event loop: milliseconds, unless that process is stuck).
GATHER_TIMEOUT_S = 2.0


@dataclass
class Gather:
    """A front end's ``gather`` in progress: who asked, under which request id, who is left."""

    asker: "FrontEnd"
    rid: int
    asked: int
    waiting: set[int]
    answered: int = 0
    timer: asyncio.TimerHandle | None = None


class FrontEnd:
    """The engine process's view of one connected front end."""

    def __init__(self, ident: int, channel: Channel) -> None:
        self.ident = ident
        self.channel = channel
        self.pid = 0
        self.slabs: dict[int, Slab] = {}
        self.requests: dict[int, tuple[Batcher, list[asyncio.Future[Any]]]] = {}


class EngineCore:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None,
                 engine_factory: EngineFactory = load_engine) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self._engine_factory = engine_factory
        self.hosted: dict[str, Hosted] = {}
        self.handles: dict[int, Hosted] = {}
        self._next_handle = 0
        self.frontends: dict[int, FrontEnd] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._next_ident = 0
        # The last operator reload of each category (its message, stamped by the front end
        # that made it): replayed to every front end that connects, so that one started
        # after it (a killed one's replacement) or cut off when it was relayed serves what
        # the others serve, not the newest version an operator had rolled back from.
        self.reloads: dict[str, Message] = {}
        self.gathers: dict[int, Gather] = {}
        self._next_gather = 0
        self._stopping = asyncio.Event()
        # Long enough for any request pinned before a reload to reach the engine.
        self.unload_grace_s = settings.request_deadline_ms / 1e3 + 5.0

    # ------------------------------------------------------------------ serving
    async def serve(self, path: Path) -> None:
        """Accept front ends on ``path`` until :meth:`stop`; then drain every batcher.
        Raises :class:`AcceptLoopDied` if accepting front ends ends otherwise."""
        loop = asyncio.get_running_loop()
        listener = listen_unix(path)
        log.info("engine process %d listening on %s", os.getpid(), path)
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
        await asyncio.gather(*(h.batcher.drain(self.settings.graceful_shutdown_s) for h in self.hosted.values()))
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                self._relay_part(frontend, frame)
                return
            if kind != frames.SUBMIT:
                raise ValueError(f"unknown frame kind {kind}")
            submit = frames.unpack_submit(frame)
        except frames.UNREADABLE:
            # A front end that sends garbage has a bug; the channel to it stays usable, and a
            # request whose id could not be read waits out its own deadline there.
            log.exception("front end %d (pid %d): unreadable frame", frontend.ident, frontend.pid)
            return
        self._submit_or_fail(frontend, submit)

    def _submit_or_fail(self, frontend: FrontEnd, submit: frames.Submit, observed: bool = True) -> None:
        try:
            self._submit(frontend, submit, observed)
        except Exception as exc:  # one bad request must not end the process: its images fail
            log.exception("front end %d (pid %d): submit %d failed", frontend.ident, frontend.pid, submit.rid)
            failed = frames.Outcome(frames.ENGINE_ERROR, message=f"engine process: {type(exc).__name__}: {exc}")
            frontend.channel.send_frame(frames.pack_result(submit.rid, [failed] * len(submit.slots)))

    def _handle(self, frontend: FrontEnd, message: Message, fds: list[int]) -> None:
        """One control message. ``fds``: its descriptors; a handler that keeps one takes it
        out of the list, the caller closes the rest."""
        op = message["op"]
        if op == "hello":
            frontend.pid = int(message["pid"])
            log.info("front end %d connected (pid %d)", frontend.ident, frontend.pid)
            for reload in self.reloads.values():  # it ignores those it followed already
                frontend.channel.send({**reload, "replayed": True})
        elif op == "slab":
            if len(fds) != 1:
                raise ValueError(f"slab message with {len(fds)} descriptors, not 1")
            ident, size, slots = int(message["id"]), int(message["size"]), int(message["slots"])
            old = frontend.slabs.pop(ident, None)
            if old is not None:
                old.close()
            # Taken out of fds first: attach owns it from the call on (and closes it if it fails).
            frontend.slabs[ident] = Slab.attach(fds.pop(), size, slots, str(message["name"]))
        elif op == "warm":  # a submit that is a warm-up: run and answered like one, observed by no metric
            submit = frames.Submit(int(message["rid"]), int(message["handle"]), int(message["slab"]),
                                   float(message["deadline"]), [int(slot) for slot in message["slots"]])
            self._submit_or_fail(frontend, submit, observed=False)
        elif op == "acquire":
            self._spawn(self._acquire(frontend, int(message["rid"]), str(message["dir"])))
        elif op == "release":
            self._release(frontend.ident, str(message["dir"]))
        elif op == "cancel":
            # Only what waits for a batch: the front end frees the slots on the answer, so an
            # image already running is answered when its batch is done writing into its slot.
            request = frontend.requests.get(int(message["rid"]))
            if request is not None:
                batcher, futures = request
                batcher.cancel_queued(futures)
        elif op == "reload":  # one front end reloaded a category: every other one follows
            # A front end also hands over its own record when it connects (this process may
            # be new): only a reload newer than the one recorded is recorded and relayed.
            category, stamp = str(message["category"]), int(message["stamp"])
            known = self.reloads.get(category)
            if known is not None and int(known["stamp"]) >= stamp:
                return
            self.reloads[category] = {"op": "reload", "category": category, "version": message.get("version"),
                                      "stamp": stamp}
            for other in self.frontends.values():
                if other is not frontend:
                    other.channel.send(self.reloads[category])
        elif op == "gather":
            self._gather(frontend, int(message["rid"]), str(message["topic"]), dict(message.get("args") or {}))
        else:
            raise ValueError(f"unknown message {op!r}")

    # ------------------------------------------------------------------ gathers
    def _gather(self, asker: FrontEnd, rid: int, topic: str, args: Message) -> None:
        others = [f for f in self.frontends.values() if f is not asker]
        self._next_gather += 1
        gid = self._next_gather
        gather = self.gathers[gid] = Gather(asker, rid, len(others), {f.ident for f in others})
        for other in others:
            other.channel.send({"op": "collect", "gid": gid, "topic": topic, "args": args})
        if others:
            gather.timer = asyncio.get_running_loop().call_later(GATHER_TIMEOUT_S, self._end_gather, gid)
        else:
            self._end_gather(gid)

    def _relay_part(self, frontend: FrontEnd, frame: bytes) -> None:
        gid, last, _ = frames.unpack_part(frame)
        gather = self.gathers.get(gid)
        if gather is None or frontend.ident not in gather.waiting:
            return  # late (the gather ended without it) or not asked: dropped
        gather.asker.channel.send_frame(frames.readdress_part(frame, gather.rid))
        if last:
            gather.waiting.discard(frontend.ident)
            gather.answered += 1
            if not gather.waiting:
                self._end_gather(gid)

    def _end_gather(self, gid: int) -> None:
        gather = self.gathers.pop(gid, None)
        if gather is None:
            return
        if gather.timer is not None:
            gather.timer.cancel()
        if gather.answered < gather.asked:
            log.warning("gather %d: %d of %d front ends did not answer (gone, or not within %.0f s)", gid,
                        gather.asked - gather.answered, gather.asked, GATHER_TIMEOUT_S)
        gather.asker.channel.send({"op": "gathered", "rid": gather.rid, "asked": gather.asked,
                                   "answered": gather.answered})

    def _disconnected(self, ident: int) -> None:
        frontend = self.frontends.pop(ident, None)
        if frontend is None:
            return
        log.warning("front end %d (pid %d) disconnected; dropping its queued images and holds",
                    ident, frontend.pid)
        for batcher, futures in frontend.requests.values():
            batcher.cancel_queued(futures)  # dropped before the engine; a running batch finishes into its slab
        for version_dir in [d for d, h in self.hosted.items() if ident in h.holders]:
            self._release(ident, version_dir)
        for slab in frontend.slabs.values():
            slab.close()
        frontend.slabs.clear()
        for gid, gather in list(self.gathers.items()):
            if gather.asker is frontend:  # no one to answer any more
                if gather.timer is not None:
                    gather.timer.cancel()
                del self.gathers[gid]
            elif ident in gather.waiting:  # it will not answer: the others' answers go now
                gather.waiting.discard(ident)
                if not gather.waiting:
                    self._end_gather(gid)

    # ------------------------------------------------------------------ engines
    async def _acquire(self, frontend: FrontEnd, rid: int, version_dir: str) -> None:
        try:
            hosted = await self._load(version_dir)
        except Exception as exc:
            log.error("cannot load %s: %s", version_dir, exc)
            frontend.channel.send({"op": "error", "rid": rid, "message": f"{type(exc).__name__}: {exc}"})
            return
        if frontend.ident not in self.frontends:  # it left while this loaded: unload later unless taken
            self._unload_later_if_idle(version_dir, hosted)
            return
        hosted.holders.add(frontend.ident)
        if hosted.unload is not None:
            hosted.unload.cancel()
            hosted.unload = None
        frontend.channel.send({"op": "acquired", "rid": rid, "name": hosted.engine.name, "handle": hosted.handle,
                               "max_batch_size": int(hosted.engine.max_batch_size),
                               "warmup_ms": hosted.warmup_ms})

    async def _load(self, version_dir: str) -> Hosted:
        async with self._loading.setdefault(version_dir, asyncio.Lock()):
            hosted = self.hosted.get(version_dir)
            if hosted is not None:
                return hosted
            s = self.settings
            engine = await asyncio.to_thread(self._engine_factory, Path(version_dir), kind=s.engine, device=s.device,
                                             threads=s.intra_op_threads, max_batch_size=s.max_batch_size)
            warmup_ms = await asyncio.to_thread(warm_engine, engine, s.max_batch_size)
            category = engine.manifest.category
            batcher = Batcher(category, self._runner(category, engine), label=engine.name,
                              max_batch_size=max(1, min(s.max_batch_size, int(engine.max_batch_size))),
                              max_queue_delay_s=s.max_queue_delay_ms / 1e3,
                              max_queue_size=s.max_queue_size * max(1, s.api_processes), observer=self.metrics,
                              lent_payloads=True)
            if not any(h.engine.manifest.category == category for h in self.hosted.values()):
                # This process serves the category from now on: its queue depth is a series from
                # the start (0), not only after the first batch. A restarted engine process's
                # series had left /metrics with the process it replaces, and the autoscaler and
                # the dashboards read nothing until traffic came back.
                self.metrics.set_queue_depth(category, 0)
            self._next_handle += 1
            hosted = self.hosted[version_dir] = Hosted(engine, batcher, warmup_ms, self._next_handle)
            self.handles[hosted.handle] = hosted
            log.info("loaded %s on %s (warm-up %.0f ms)", version_dir, engine.name, warmup_ms)
            return hosted

    def _release(self, ident: int, version_dir: str) -> None:
        hosted = self.hosted.get(version_dir)
        if hosted is None or ident not in hosted.holders:
            return
        hosted.holders.discard(ident)
        self._unload_later_if_idle(version_dir, hosted)

    def _unload_later_if_idle(self, version_dir: str, hosted: Hosted) -> None:
        if not hosted.holders and hosted.unload is None:
            hosted.unload = asyncio.get_running_loop().call_later(self.unload_grace_s, self._unload, version_dir)

    def _unload(self, version_dir: str) -> None:
        hosted = self.hosted.get(version_dir)
        if hosted is None or hosted.holders:
            return
        del self.hosted[version_dir]
        del self.handles[hosted.handle]
        log.info("unloading %s: no front end holds it", version_dir)
        self._spawn(hosted.batcher.drain(self.settings.graceful_shutdown_s))

    def _runner(self, category: str, engine: Engine) -> Any:
        """The batcher's ``run_batch``: inputs from the slots, maps back into them."""
        run = engine_runner(engine)

        def run_batch(payloads: list[Payload]) -> list[float]:
            results = run([p.slab.input(p.slot) for p in payloads])
            for payload, (_, heat) in zip(payloads, results):
                payload.slab.output(payload.slot)[...] = heat
            fed = {p.frontend for p in payloads if p.observed}  # warm-ups feed no batch the metrics count
            if fed:
                self.metrics.batch_frontends.labels(category).observe(len(fed))
            return [score for score, _ in results]
        return run_batch

    # ------------------------------------------------------------------ requests
    def _submit(self, frontend: FrontEnd, submit: frames.Submit, observed: bool = True) -> None:
        """Queue a front end's request; ``observed=False``: a warm-up (see the module docstring)."""
        rid, slots, channel = submit.rid, submit.slots, frontend.channel

        def refuse(code: int) -> None:
            channel.send_frame(frames.pack_result(rid, [frames.Outcome(code)] * len(slots)))
        hosted = self.handles.get(submit.handle)
        if hosted is None:
            refuse(frames.NOT_LOADED)
            return
        slab = frontend.slabs[submit.slab]
        for slot in slots:
            slab.check_slot(slot)  # before the batch, which must not fail for one bad request
        payloads = [Payload(frontend.ident, slab, slot, observed) for slot in slots]
        try:
            futures = hosted.batcher.submit_many(payloads, submit.deadline, observed)
        except QueueFull:
            refuse(frames.QUEUE_FULL)
            return
        except BatcherClosed:
            refuse(frames.CLOSED)
            return
        frontend.requests[rid] = (hosted.batcher, futures)
        remaining = len(futures)

        def answer_when_all_done(_: asyncio.Future[Any]) -> None:  # one answer per request, no task
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                frontend.requests.pop(rid, None)
                channel.send_frame(frames.pack_result(rid, [_outcome(f) for f in futures]))
        for future in futures:
            future.add_done_callback(answer_when_all_done)


def _outcome(future: asyncio.Future[Batched[float]]) -> frames.Outcome:
    if future.cancelled():
        return frames.Outcome(frames.CANCELLED)
    exc = future.exception()
    if exc is None:
        done = future.result()
        return frames.Outcome(frames.OK, done.value, done.batch_size, done.queue_ms, done.run_ms)
    if isinstance(exc, DeadlineExceeded):
        return frames.Outcome(frames.DEADLINE)
    if isinstance(exc, BatcherClosed):
        return frames.Outcome(frames.CLOSED)
    return frames.Outcome(frames.ENGINE_ERROR, message=f"{type(exc).__name__}: {exc}")


def run_engine_process(overrides: dict[str, Any], socket_path: str) -> None:
    """Entry point of the engine process (started by :mod:`service.supervisor`)."""
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s engine %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the supervisor stops the front ends first and
    # then this process (SIGTERM), so that their requests in flight still get engine time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory(settings.heap_retain_mb << 20)
    freeze_startup_objects()

    async def main() -> None:
        core = EngineCore(settings)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, core.stop)
        started = time.monotonic()
        await core.serve(Path(socket_path))
        log.info("engine process stopped after %.0f s", time.monotonic() - started)

    try:
        import uvloop  # the front ends' loop too (uvicorn picks it up)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except ImportError:
        asyncio.run(main())
