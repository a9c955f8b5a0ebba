"""A front end's link to the engine process (multi-process mode, :mod:`service.engine_core`).

Two pieces here and a third in :mod:`service.pipeline.remote_batcher`, so that the rest of
the pipeline cannot tell it is not running the engine itself:

* :class:`EngineClient`: the connection. It owns this process's shared-memory slabs (one per
  input size, ``max_queue_size`` slots each: the front end's queue budget), sends
  ``submit`` (a packed frame, :mod:`service.ipc.frames`) and ``cancel``/``acquire``/``release``,
  and resolves futures from the answers.
  When the engine process goes away, every image in flight fails with
  :class:`EngineUnavailable` (503 + Retry-After) and the client reconnects, hands its slabs
  to the new engine process and acquires again what its registry serves or warms up
  (:mod:`service.pipeline.holds`). A folder the new engine process cannot load is let go of
  alone (``on_lost``: the registry marks its category failed); the others serve on.
  Reconnects back off (:class:`~service.ipc.retry.Backoff`) until a connection has stayed
  up a while, so an engine process that drops every connection is not hammered by a tight loop.
* :class:`~service.pipeline.remote_batcher.RemoteBatcher`: what a
  :class:`~service.pipeline.runtime.Lane` batches with here, in place of a local
  :class:`~service.pipeline.batcher.Batcher`. It forms no batch: the engine process does,
  across all front ends.
* :class:`~service.pipeline.remote_engine.RemoteEngine` (imported here for the runtime):
  what the registry's engine factory returns here. Its ``run`` goes through the engine
  process too (the registry warms every version through it, which checks the whole path
  once per front end and version).

It also answers for this front end when another one gathers what every front end holds
(:meth:`EngineClient.collect`, relayed by the engine process): an admin's view, such as the
recent scores, asks on demand, so no image pays for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest
from service.config import Settings
from service.engines.base import EngineError
from service.ipc import frames
from service.ipc.channel import Channel, Incoming, Message
from service.ipc.retry import Backoff
from service.ipc.slab import Slab, SlotPool
from service.pipeline.batcher import Batched, BatcherClosed, BatcherError, DeadlineExceeded, QueueFull
from service.pipeline.holds import VersionHolds
from service.pipeline.remote_engine import RemoteEngine

log = logging.getLogger(__name__)

_CONNECT_WAIT_S = 60.0  # how long a load waits for the engine process (it may be loading others)
_STABLE_AFTER_S = 5.0  # a connection up this long was a good one: the next reconnect starts at once
_WARMUP_DEADLINE_S = 300.0  # a warm-up batch through the engine process: first CUDA / TensorRT runs are slow
_GATHER_WAIT_S = 5.0  # the engine process answers a gather within 2 s (engine_core.GATHER_TIMEOUT_S)
_PART_ITEMS = 1000  # items per part frame: a collector's items are small, so a frame stays near a MB


@dataclass
class Collected:
    """What the other front ends answered to a gather: their items, and how many of them
    answered of those the engine process asked (fewer: one was stuck or went away)."""

    items: list[Any]
    asked: int
    answered: int


class EngineUnavailable(BatcherError):
    """The engine process is not reachable right now (restarting): answer 503 + Retry-After."""


@dataclass
class _Request:
    slab: Slab
    pool: SlotPool
    slots: list[int]
    futures: list["_ImageFuture"]
    cancel_sent: bool = False


class _ImageFuture(asyncio.Future):  # type: ignore[type-arg]
    """One image's answer. Cancelling it (the caller's deadline, a client gone) tells the
    engine process to drop the request's images before the engine runs them: a hook on
    ``cancel`` itself, where a done-callback per image would cost a loop turn per answer."""

    def __init__(self, client: "EngineClient", rid: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._client = client
        self._rid = rid

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self._client._cancelled(self._rid)
        return True


class EngineClient:
    """See the module docstring. Create with :meth:`start` on the running loop."""

    def __init__(self, settings: Settings, socket_path: Path) -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.on_reload: Callable[[str, str | None], Awaitable[Any]] | None = None
        # After every connection, the first included: loads that failed while there was none get another try.
        self.on_connected: Callable[[], Awaitable[Any]] | None = None
        # (category, version folder, why): a new engine process could not load a folder served here.
        self.on_lost: Callable[[str, str, Exception], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: Channel | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._slabs: dict[int, tuple[int, Slab, SlotPool]] = {}  # input size -> (slab id, slab, its free slots)
        self._requests: dict[int, _Request] = {}
        self._calls: dict[int, asyncio.Future[Message]] = {}
        # topic -> what this front end answers when another one gathers (called on the loop,
        # with the gather's args; a list of JSON-able items), e.g. "recent": pipeline/recent.py.
        self.collectors: dict[str, Callable[[Message], list[Any]]] = {}
        self._gathering: dict[int, list[Any]] = {}  # this front end's gathers in progress -> items so far
        self._holds = VersionHolds()  # the version folders served or warming up here
        self._handles: dict[str, int] = {}  # version folder -> the engine process's number for it
        # category -> (stamp, version) of the last operator reload made or followed here: what
        # a reload heard again is checked against (followed once), and what a new engine
        # process learns at the handshake (it replays it to front ends that start later).
        self._reloads: dict[str, tuple[int, str | None]] = {}
        self._ids = itertools.count(1)
        self._connector: asyncio.Task[None] | None = None
        # The wait before a connection attempt grows across attempts, reconnects included
        # (not per attempt loop), and starts over only after a connection that stayed up.
        self._retry = Backoff(0.05, 1.0)
        self._up_since: float | None = None  # when the current connection was fully made

    # ------------------------------------------------------------------ connection
    def start(self) -> None:
        """Connect in the background (from the running loop); loads wait for the connection."""
        self._loop = asyncio.get_running_loop()
        self._connector = self._loop.create_task(self._connect_loop(), name="engine-connect")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the client lives on (set by :meth:`start`)."""
        assert self._loop is not None, "EngineClient.start() not called"
        return self._loop

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
        if self._channel is not None:
            self._channel.close()
        for _, slab, _ in self._slabs.values():
            slab.close()

    async def _connect_loop(self, pause_first: bool = False) -> None:
        if pause_first:
            await asyncio.sleep(self._retry.next())
        while not self._closing:
            sock: socket.socket | None = None
            try:  # the socket too: out of descriptors for a moment must not end the reconnects
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await asyncio.to_thread(sock.connect, str(self.socket_path))
            except OSError:
                if sock is not None:
                    sock.close()
                await asyncio.sleep(self._retry.next())
                continue
            await self._handshake(sock)
            return

    async def _handshake(self, sock: socket.socket) -> None:
        """Hand over the slabs and acquire again what is used here; then connected. If the
        channel ends meanwhile, its close callback starts the next attempt (after a pause)."""
        channel = Channel(sock, self.loop, self._on_messages, self._disconnected, name="engine")
        self._channel = channel
        channel.start()
        channel.send({"op": "hello", "pid": os.getpid()})
        for ident, slab, _ in self._slabs.values():
            self._send_slab(ident, slab)
        for category, (stamp, version) in self._reloads.items():  # the engine process keeps the newest
            channel.send(_reload_message(category, version, stamp))
        self._handles.clear()  # numbers of the engine process that went away
        for version_dir in self._holds.folders():  # what is served or warming up here, again
            try:
                answer = await self._call({"op": "acquire", "dir": version_dir}, require_connected=False)
            except EngineUnavailable as exc:
                log.error("engine process: lost again while acquiring again what is served: %s", exc)
                return
            except EngineError as exc:  # this folder alone: the other categories still serve
                self._lose(version_dir, exc)
                continue
            self._handles[version_dir] = int(answer["handle"])
        for version_dir in [d for d in self._handles if d not in self._holds]:
            channel.send({"op": "release", "dir": version_dir})  # let go of while this reconnected
        log.info("connected to the engine process at %s", self.socket_path)
        self._up_since = time.monotonic()
        self._connected.set()
        if self.on_connected is not None:
            await self.on_connected()

    def _lose(self, version_dir: str, exc: EngineError) -> None:
        """The engine process cannot load ``version_dir`` (any more): no use of it here is
        left to count, and the categories it served are failed loads now, retried as such
        (the next connection, a newer export), rather than failing every category with the
        connection. Each retry stays one load a connection, with no tight loop."""
        log.error("engine process: cannot acquire %s again; its categories fail until it loads: %s",
                  version_dir, exc)
        for category in self._holds.forget(version_dir):
            if self.on_lost is not None:
                self.on_lost(category, version_dir, exc)

    def _disconnected(self) -> None:
        self._connected.clear()
        self._channel = None
        # Only a connection that stayed up resets the wait: one that ends soon after it was
        # made (an engine process dying while it loads) grows it, so no reconnect loop is tight.
        stable = self._up_since is not None and time.monotonic() - self._up_since >= _STABLE_AFTER_S
        self._up_since = None
        if stable:
            self._retry.reset()
        lost = EngineUnavailable("the engine process went away; retry")
        in_use: set[int] = set()
        for request in self._requests.values():
            for future in request.futures:
                if not future.done():
                    future.set_exception(lost)
            in_use.add(request.slab.layout.size)
            request.pool.give_back(request.slots)
        self._requests.clear()
        for call in self._calls.values():
            if not call.done():
                call.set_exception(lost)
        self._calls.clear()
        if not self._closing:
            # A channel can also end with the engine process alive (a corrupt stream, a failed
            # send), its batches still reading and writing these slots: a slab with slots in
            # flight is never handed out again, a new one takes its place.
            for size in in_use:
                ident, old, pool = self._slabs[size]
                old.close()
                self._slabs[size] = (ident, self._new_slab(size), pool)
            log.error("lost the engine process; reconnecting")
            self._connector = self.loop.create_task(self._connect_loop(pause_first=not stable),
                                                     name="engine-connect")

    def _send(self, message: Message, fds: Sequence[int] = ()) -> None:
        if self._channel is None:
            raise EngineUnavailable("the engine process is not connected; retry")
        self._channel.send(message, fds)

    def _send_slab(self, ident: int, slab: Slab) -> None:
        self._send({"op": "slab", "id": ident, "size": slab.layout.size, "slots": slab.layout.slots,
                    "name": slab.name}, [slab.fd])

    # ------------------------------------------------------------------ answers
    def _on_messages(self, batch: list[tuple[Incoming, list[int]]]) -> None:
        for message, fds in batch:
            for fd in fds:  # the engine process sends none; never keep one by accident
                os.close(fd)
            if isinstance(message, bytes):
                try:
                    if message[0] == frames.RESULT:
                        self._resolve(*frames.unpack_result(message))
                    else:
                        self._gathered_part(message)
                except frames.UNREADABLE:  # a bad JSON payload of a part too (a ValueError)
                    log.exception("unreadable frame from the engine process")
                continue
            op = message.get("op")
            if op in ("acquired", "error", "gathered"):
                call = self._calls.pop(int(message["rid"]), None)
                if call is not None and not call.done():
                    call.set_result(message)
                elif op == "error" and int(message["rid"]) in self._requests:  # a warm message it could not read
                    rid = int(message["rid"])
                    failed = frames.Outcome(frames.ENGINE_ERROR, message=f"engine process: {message.get('message')}")
                    self._resolve(rid, [failed] * len(self._requests[rid].slots))
            elif op == "reload":
                self._follow(str(message["category"]), message.get("version"), int(message["stamp"]),
                             bool(message.get("replayed")))
            elif op == "collect":
                self._answer_collect(int(message["gid"]), str(message["topic"]), message.get("args") or {})

    def _follow(self, category: str, version: str | None, stamp: int, replayed: bool) -> None:
        """Another front end's reload, relayed as it happens or ``replayed`` to this one when it
        connects: followed once. A replayed reload of the newest version (no pin) where this
        front end knew of none is only recorded: it serves what that reload chose since it started."""
        known = self._reloads.get(category)
        if known is not None and known[0] >= stamp:
            return
        self._reloads[category] = (stamp, version)
        if (known is not None or version is not None or not replayed) and self.on_reload is not None:
            self.loop.create_task(self.on_reload(category, version))

    def _resolve(self, rid: int, outcomes: list[frames.Outcome]) -> None:
        request = self._requests.pop(rid, None)
        if request is None:
            return
        for future, slot, outcome in zip(request.futures, request.slots, outcomes):
            if future.done():
                continue
            if outcome.code == frames.OK:
                heat = request.slab.output(slot).copy()  # the slot is reused once given back
                future.set_result(Batched(value=(outcome.score, heat), batch_size=outcome.batch_size,
                                          queue_ms=outcome.queue_ms, run_ms=outcome.run_ms))
            elif outcome.code == frames.CANCELLED:
                future.cancel()  # the request is gone from _requests: no cancel is sent back
            else:
                future.set_exception(_error(outcome.code, outcome.message))
        request.pool.give_back(request.slots)

    # ------------------------------------------------------------------ calls
    async def _call(self, message: Message, require_connected: bool = True) -> Message:
        if require_connected and not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), _CONNECT_WAIT_S)
            except TimeoutError:  # its text is empty: say what happened (it is what /readyz reports)
                raise EngineUnavailable(f"not connected to the engine process within {_CONNECT_WAIT_S:.0f} s; "
                                        "retried once it connects") from None
        rid = next(self._ids)
        call = self._calls[rid] = self.loop.create_future()
        self._send({**message, "rid": rid})
        answer = await call
        if answer["op"] == "error":
            raise EngineError(f"engine process: {answer['message']}")
        return answer

    async def acquire(self, version_dir: Path) -> Message:
        """Have the engine process load (or share) ``version_dir`` and keep it for this front
        end, until :meth:`release` (a failed warm-up) or :meth:`swapped_in` of a newer version."""
        folder = str(version_dir)
        self._holds.take(folder)
        try:
            answer = await self._call({"op": "acquire", "dir": folder})
        except BaseException:
            self.release(folder)
            raise
        self._handles[folder] = int(answer["handle"])
        return answer

    def swapped_in(self, version_dir: Path) -> None:
        """The registry serves ``version_dir`` now: the version served before lets go of it
        (requests pinned to it still finish: the engine process unloads after a grace period).
        Not at :meth:`acquire`: until the warm-up succeeded, the version before still serves."""
        previous = self._holds.serve(version_dir.parent.name, str(version_dir))
        if previous is not None:
            self.release(previous)  # the same folder too: reloading it acquired it once more

    def release(self, version_dir: str) -> None:
        """One user of ``version_dir`` fewer; the engine process hears when none is left."""
        if self._holds.drop(version_dir) and self._connected.is_set() and self._channel is not None:
            self._channel.send({"op": "release", "dir": version_dir})  # reconnecting: left out there

    def broadcast_reload(self, category: str, version: str | None) -> None:
        """Ask every other front end to reload ``category`` like this one did, those started
        later included (the engine process replays the last reload of each category)."""
        stamp = max(time.time_ns(), self._reloads.get(category, (0, None))[0] + 1)  # after what it replaces
        self._reloads[category] = (stamp, version)
        if self._channel is not None:  # else sent at the handshake, with the record
            self._channel.send(_reload_message(category, version, stamp))

    # ------------------------------------------------------------------ gathers
    async def collect(self, topic: str, args: Message) -> Collected:
        """Every other front end's ``collectors[topic](args)``, through the engine process (not
        this one's: the caller has it). Raises :class:`EngineUnavailable` without an answer."""
        rid = next(self._ids)
        call = self._calls[rid] = self.loop.create_future()
        items = self._gathering[rid] = []
        try:
            self._send({"op": "gather", "rid": rid, "topic": topic, "args": args})
            answer = await asyncio.wait_for(call, _GATHER_WAIT_S)
        except TimeoutError:
            raise EngineUnavailable(f"the engine process did not answer a gather within {_GATHER_WAIT_S:.0f} s") \
                from None
        finally:
            self._calls.pop(rid, None)
            self._gathering.pop(rid, None)
        return Collected(items, int(answer["asked"]), int(answer["answered"]))

    def _gathered_part(self, frame: bytes) -> None:
        rid, _, payload = frames.unpack_part(frame)
        items = self._gathering.get(rid)
        if items is not None:  # else the gather ended (timed out) before it
            items.extend(json.loads(payload))

    def _answer_collect(self, gid: int, topic: str, args: Message) -> None:
        """Another front end gathers: this one's items, in parts (the last one marked, even
        when there is none: the engine process waits for it)."""
        collector = self.collectors.get(topic)
        try:
            items = collector(args) if collector is not None else []
        except Exception:  # this front end's share is left out, the gather still ends
            log.exception("collecting %s for another front end failed", topic)
            items = []
        channel = self._channel
        if channel is None:
            return
        for start in range(0, max(1, len(items)), _PART_ITEMS):
            chunk = json.dumps(items[start:start + _PART_ITEMS], separators=(",", ":")).encode()
            channel.send_frame(frames.pack_part(gid, start + _PART_ITEMS >= len(items), chunk))

    # ------------------------------------------------------------------ images
    def pool(self, size: int) -> SlotPool:
        entry = self._slabs.get(size)
        if entry is None:
            ident = len(self._slabs) + 1
            slab = self._new_slab(size)
            entry = self._slabs[size] = (ident, slab, SlotPool(self.settings.max_queue_size))
            if self._channel is not None:
                self._send_slab(ident, slab)
        return entry[2]

    def _new_slab(self, size: int) -> Slab:
        return Slab.create(size, self.settings.max_queue_size, name=f"msflow-{os.getpid()}-{size}")

    def submit(self, version_dir: str, tensors: Sequence[np.ndarray], deadline: float,
               observed: bool = True) -> list[asyncio.Future[Any]]:
        """Queue ``tensors`` (all or none) on the engine process; one future per image.
        ``observed=False``: a warm-up, which the engine process runs like a request but leaves
        out of every metric (sent as a ``warm`` control message, not a packed submit)."""
        handle = self._handles.get(version_dir)
        if not self.connected or handle is None or self._channel is None:
            raise EngineUnavailable("the engine process is restarting; retry")
        size = int(tensors[0].shape[0])
        pool = self.pool(size)
        ident, slab, _ = self._slabs[size]
        slots = pool.take(len(tensors))
        if slots is None:
            raise QueueFull(f"no room: {pool.free} of {pool.capacity} engine slots free, request has {len(tensors)}")
        for tensor, slot in zip(tensors, slots):
            slab.input(slot)[...] = tensor
        rid = next(self._ids)
        assert self._loop is not None  # the attribute, not the property: once per request
        futures = [_ImageFuture(self, rid, self._loop) for _ in tensors]
        self._requests[rid] = _Request(slab, pool, slots, futures)
        if observed:
            self._channel.send_frame(frames.pack_submit(rid, handle, ident, deadline, slots))
        else:
            self._channel.send({"op": "warm", "rid": rid, "handle": handle, "slab": ident, "deadline": deadline,
                                "slots": slots})
        return futures  # type: ignore[return-value]

    def _cancelled(self, rid: int) -> None:
        # The caller gave up (deadline, client gone): the engine drops the images before the
        # engine runs them and answers; the slots come back with that answer, not before,
        # since the engine process may be writing into them.
        request = self._requests.get(rid)
        if request is not None and not request.cancel_sent and self._channel is not None:
            request.cancel_sent = True
            self._channel.send({"op": "cancel", "rid": rid})

    async def run(self, version_dir: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One whole batch through the engine process (the registry's warm-up), in parts no
        larger than this front end's slots. Not bound by the request deadline: a warm-up
        waits out the batching window and the engine's first (slowest) run, however short
        requests' deadlines are. Never observed by the metrics (``submit(observed=False)``):
        one process warms outside its batcher, and counted here, every front-end start and
        reload added a batch of 8 images that no one inspected."""
        deadline = time.monotonic() + _WARMUP_DEADLINE_S
        step = self.pool(int(images.shape[1])).capacity
        results: list[Batched[Any]] = []
        for start in range(0, len(images), step):
            # gather: when one image fails, the others' errors are read too (no "never retrieved")
            results += await asyncio.gather(*self.submit(version_dir, list(images[start:start + step]), deadline,
                                                         observed=False))
        return (np.array([r.value[0] for r in results], dtype=np.float32),
                np.stack([r.value[1] for r in results]))

    # ------------------------------------------------------------------ for the registry (worker threads)
    def engine_factory(self, version_dir: Path, **_: Any) -> "RemoteEngine":
        """The registry's engine factory here (called in a worker thread, like load_engine)."""
        manifest = Manifest.read(version_dir)
        answer = asyncio.run_coroutine_threadsafe(self.acquire(version_dir), self.loop).result()
        return RemoteEngine(self, version_dir, manifest, str(answer["name"]), int(answer["max_batch_size"]))


def _reload_message(category: str, version: str | None, stamp: int) -> Message:
    """``stamp``: when the operator's reload was made (ns, this host's wall clock, which every
    process of a server shares): the newest reload of a category wins everywhere."""
    return {"op": "reload", "category": category, "version": version, "stamp": stamp}


def _error(code: int, message: str) -> Exception:
    if code == frames.QUEUE_FULL:
        return QueueFull("the engine process's queue is full")
    if code == frames.CLOSED:
        return BatcherClosed("the engine process is shutting down")
    if code == frames.DEADLINE:
        return DeadlineExceeded("deadline passed in the engine process's queue")
    if code == frames.NOT_LOADED:
        return EngineUnavailable("the engine process no longer holds this version; retry")
    return EngineError(message or "engine failed")

