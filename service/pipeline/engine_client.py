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
  (:mod:`service.pipeline.holds`).
* :class:`~service.pipeline.remote_batcher.RemoteBatcher`: what a
  :class:`~service.pipeline.runtime.Lane` batches with here, in place of a local
  :class:`~service.pipeline.batcher.Batcher`. It forms no batch: the engine process does,
  across all front ends.
* :class:`RemoteEngine`: what the registry's engine factory returns here. Its ``run`` goes
  through the engine process too (the registry warms every version through it, which
  checks the whole path once per front end and version).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
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
from service.ipc.slab import Slab, SlotPool
from service.pipeline.batcher import Batched, BatcherClosed, BatcherError, DeadlineExceeded, QueueFull
from service.pipeline.holds import VersionHolds

log = logging.getLogger(__name__)

_CONNECT_WAIT_S = 60.0  # how long a load waits for the engine process (it may be loading others)
_WARMUP_DEADLINE_S = 300.0  # a warm-up batch through the engine process: first CUDA / TensorRT runs are slow


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
        self.on_reconnect: Callable[[], Awaitable[Any]] | None = None  # after a lost engine process is back
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: Channel | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._slabs: dict[int, tuple[int, Slab, SlotPool]] = {}  # input size -> (slab id, slab, its free slots)
        self._requests: dict[int, _Request] = {}
        self._calls: dict[int, asyncio.Future[Message]] = {}
        self._holds = VersionHolds()  # the version folders served or warming up here
        self._handles: dict[str, int] = {}  # version folder -> the engine process's number for it
        self._ids = itertools.count(1)
        self._connector: asyncio.Task[None] | None = None
        self._ever_connected = False

    # ------------------------------------------------------------------ connection
    def start(self) -> None:
        """Connect in the background (from the running loop); loads wait for the connection."""
        self._loop = asyncio.get_running_loop()
        self._connector = self._loop.create_task(self._connect_loop(), name="engine-connect")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
        if self._channel is not None:
            self._channel.close()
        for _, slab, _ in self._slabs.values():
            slab.close()

    async def _connect_loop(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await asyncio.to_thread(sock.connect, str(self.socket_path))
            except OSError:
                sock.close()
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            delay = 0.05
            assert self._loop is not None
            channel = Channel(sock, self._loop, self._on_messages, self._disconnected, name="engine")
            self._channel = channel
            channel.start()
            channel.send({"op": "hello", "pid": os.getpid()})
            for ident, slab, _ in self._slabs.values():
                self._send_slab(ident, slab)
            self._handles.clear()  # numbers of the engine process that went away
            try:
                for version_dir in self._holds.folders():  # what is served or warming up here, again
                    answer = await self._call({"op": "acquire", "dir": version_dir}, require_connected=False)
                    self._handles[version_dir] = int(answer["handle"])
            except (EngineError, EngineUnavailable) as exc:
                log.error("engine process: re-acquiring after reconnect failed: %s", exc)
                channel.close()  # its close callback starts the next attempt
                return
            for version_dir in [d for d in self._handles if d not in self._holds]:
                channel.send({"op": "release", "dir": version_dir})  # let go of while this reconnected
            log.info("connected to the engine process at %s", self.socket_path)
            again, self._ever_connected = self._ever_connected, True
            self._connected.set()
            if again and self.on_reconnect is not None:
                await self.on_reconnect()
            return

    def _disconnected(self) -> None:
        self._connected.clear()
        self._channel = None
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
            assert self._loop is not None
            self._connector = self._loop.create_task(self._connect_loop(), name="engine-connect")

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
                    self._resolve(*frames.unpack_result(message))
                except frames.UNREADABLE:
                    log.exception("unreadable frame from the engine process")
                continue
            op = message.get("op")
            if op in ("acquired", "error"):
                call = self._calls.pop(int(message["rid"]), None)
                if call is not None and not call.done():
                    call.set_result(message)
            elif op == "reload" and self.on_reload is not None:
                assert self._loop is not None
                self._loop.create_task(self.on_reload(str(message["category"]), message.get("version")))

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
        if require_connected:
            await asyncio.wait_for(self._connected.wait(), _CONNECT_WAIT_S)
        rid = next(self._ids)
        assert self._loop is not None
        call = self._calls[rid] = self._loop.create_future()
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
        """Ask every other front end to reload ``category`` like this one did."""
        if self._channel is not None:
            self._channel.send({"op": "reload", "category": category, "version": version})

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

    def submit(self, version_dir: str, tensors: Sequence[np.ndarray], deadline: float) -> list[asyncio.Future[Any]]:
        """Queue ``tensors`` (all or none) on the engine process; one future per image."""
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
        assert self._loop is not None
        futures = [_ImageFuture(self, rid, self._loop) for _ in tensors]
        self._requests[rid] = _Request(slab, pool, slots, futures)
        self._channel.send_frame(frames.pack_submit(rid, handle, ident, deadline, slots))
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
        requests' deadlines are."""
        deadline = time.monotonic() + _WARMUP_DEADLINE_S
        step = self.pool(int(images.shape[1])).capacity
        results: list[Batched[Any]] = []
        for start in range(0, len(images), step):
            # gather: when one image fails, the others' errors are read too (no "never retrieved")
            results += await asyncio.gather(*self.submit(version_dir, list(images[start:start + step]), deadline))
        return (np.array([r.value[0] for r in results], dtype=np.float32),
                np.stack([r.value[1] for r in results]))

    # ------------------------------------------------------------------ for the registry (worker threads)
    def engine_factory(self, version_dir: Path, **_: Any) -> "RemoteEngine":
        """The registry's engine factory here (called in a worker thread, like load_engine)."""
        assert self._loop is not None
        manifest = Manifest.read(version_dir)
        answer = asyncio.run_coroutine_threadsafe(self.acquire(version_dir), self._loop).result()
        return RemoteEngine(self, version_dir, manifest, str(answer["name"]), int(answer["max_batch_size"]))


class RemoteEngine:
    """An engine that runs in the engine process (the :class:`~service.engines.base.Engine` protocol)."""

    def __init__(self, client: EngineClient, version_dir: Path, manifest: Manifest, name: str,
                 max_batch_size: int) -> None:
        self.client = client
        self.version_dir = version_dir
        self.manifest = manifest
        self.name = name
        self.max_batch_size = max_batch_size

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocking; from a worker thread only (never from the event loop it would wait on)."""
        assert self.client._loop is not None
        future: concurrent.futures.Future[tuple[np.ndarray, np.ndarray]] = asyncio.run_coroutine_threadsafe(
            self.client.run(str(self.version_dir), images), self.client._loop)
        return future.result()

    def close(self) -> None:
        """The registry gave up on this version (its warm-up failed): let the engine process
        unload it. Called from the registry's worker thread: the client lives on its loop."""
        assert self.client._loop is not None
        self.client._loop.call_soon_threadsafe(self.client.release, str(self.version_dir))


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

