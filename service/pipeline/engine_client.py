"""A front end's link to the engine process (multi-process mode, :mod:`service.engine_core`).

:class:`EngineClient` is the connection, and what the rest of the pipeline holds of the
engine process; so that the pipeline cannot tell it is not running the engine itself, the
other pieces are:

* :mod:`~service.pipeline.engine_images`: this process's images in flight (``pool``,
  ``submit``, ``run``) on its shared-memory slabs (:mod:`~service.pipeline.engine_slabs`),
  answered through the client's connection;
* :class:`~service.pipeline.remote_batcher.RemoteBatcher`: what a
  :class:`~service.pipeline.runtime.Lane` batches with here, in place of a local
  :class:`~service.pipeline.batcher.Batcher`. It forms no batch: the engine process does,
  across all front ends;
* :class:`~service.pipeline.remote_engine.RemoteEngine` (imported here for the runtime):
  what the registry's engine factory returns here. Its ``run`` goes through the engine
  process too (the registry warms every version through it, which checks the whole path
  once per front end and version);
* what front ends ask of each other through the engine process: an operator's reload that
  the others follow (:class:`~service.pipeline.peer_reloads.PeerReloads`: sent, heard,
  followed once, waited for at a front end's start; a category the store watch retires
  drops it, ``retired``), and a gather of what each one holds, such as the recent scores
  (:mod:`~service.pipeline.peer_gathers`).

The client sends ``acquire``/``release`` for what its registry serves or warms up
(:mod:`service.pipeline.holds`) and routes the answers. When the engine process goes away,
every image in flight fails with :class:`EngineUnavailable` (503 + Retry-After) and the
client reconnects, hands its slabs to the new engine process and acquires again what it
used. A folder the new engine process cannot load is let go of alone (``on_lost``: the
registry marks its category failed); the others serve on. Reconnects back off
(:class:`~service.ipc.retry.Backoff`) until a connection has stayed up a while, so an engine
process that drops every connection is not hammered by a tight loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest
from service.config import Settings
from service.engines.base import EngineError
from service.ipc import frames
from service.ipc.channel import Channel, Incoming, Message
from service.ipc.retry import Backoff
from service.ipc.slab import SlotPool
from service.metrics_buffer import FLUSH_TOPIC
from service.metrics_buffer import flush as flush_metrics
from service.pipeline.engine_errors import EngineUnavailable
from service.pipeline.engine_images import EngineImages
from service.pipeline.holds import Hold, VersionHolds
from service.pipeline.peer_gathers import Collected, Gathers
from service.pipeline.peer_reloads import PeerReloads
from service.pipeline.remote_engine import RemoteEngine

__all__ = ["Collected", "EngineClient", "EngineUnavailable", "RemoteEngine"]

log = logging.getLogger(__name__)

_CONNECT_WAIT_S = 60.0  # how long a load waits for the engine process (it may be loading others)
_STABLE_AFTER_S = 5.0  # a connection up this long was a good one: the next reconnect starts at once


class EngineClient:
    """See the module docstring. Create with :meth:`start` on the running loop."""

    def __init__(self, settings: Settings, socket_path: Path) -> None:
        self.settings = settings
        self.socket_path = socket_path
        # Another front end's reload, followed here: (category, version or None for the newest).
        self.on_reload: Callable[[str, str | None], Awaitable[Any]] | None = None
        # Another front end retired a category whose pin this one recorded: (category, whether
        # the pin still is the one retired, asked when it ends) ends it here.
        self.on_peer_retired: Callable[[str, Callable[[], bool]], Awaitable[Any]] | None = None
        # After every connection, the first included: loads that failed while there was none get another try.
        self.on_connected: Callable[[], Awaitable[Any]] | None = None
        # (category, version folder, why): a new engine process could not load a folder served here.
        self.on_lost: Callable[[str, str, Exception], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.channel: Channel | None = None  # the connection; None while there is none
        self._connected = asyncio.Event()
        self._closing = False
        self._calls: dict[int, asyncio.Future[Message]] = {}
        self._holds = VersionHolds()  # the version folders served or warming up here
        # What is held (a folder's content) -> the engine process's number for it; kept after a
        # release, for the requests pinned to it, until the next connection.
        self.handles: dict[Hold, int] = {}
        # One id space for calls and image requests: an ``error`` answer names either.
        self._ids = itertools.count(1)
        self.images = EngineImages(settings, self, self._ids)
        # Its own method, not a wrapper: a request pays no extra call for the split.
        self.submit = self.images.submit
        self.gathers = Gathers(self)
        self.gathers.collectors[FLUSH_TOPIC] = _flush_metrics  # another front end serves /metrics
        self.reloads = PeerReloads(self)  # the operator's reloads between front ends
        self._connector: asyncio.Task[None] | None = None
        # The wait before a connection attempt grows across attempts, reconnects included
        # (not per attempt loop), and starts over only after a connection that stayed up.
        self._retry = Backoff(0.05, 1.0)
        self._up_since: float | None = None  # when the current connection was fully made

    # ------------------------------------------------------------------ connection
    def start(self) -> None:
        """Connect in the background (from the running loop); loads wait for the connection."""
        self._loop = self.images.loop = asyncio.get_running_loop()
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
        if self.channel is not None:
            self.channel.close()
        self.images.close()

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
        self.channel = channel
        channel.start()
        channel.send({"op": "hello", "pid": os.getpid()})
        self.images.hand_over(channel)
        for message in self.reloads.record.messages():  # the engine process keeps the newest
            channel.send(message)
        self.handles.clear()  # numbers of the engine process that went away
        for hold in self._holds.holds():  # what is served or warming up here, again
            try:  # what the folder holds now: a content replaced since serves until the watch reloads
                answer = await self._call({"op": "acquire", "dir": hold.folder}, require_connected=False)
            except EngineUnavailable as exc:
                log.error("engine process: lost again while acquiring again what is served: %s", exc)
                return
            except EngineError as exc:  # this folder alone: the other categories still serve
                self._lose(hold, exc)
                continue
            self.handles[hold] = int(answer["handle"])
        for hold in [h for h in self.handles if h not in self._holds]:
            self._let_go(hold)  # let go of while this reconnected
        log.info("connected to the engine process at %s", self.socket_path)
        self._up_since = time.monotonic()
        self._connected.set()
        if self.on_connected is not None:
            await self.on_connected()

    async def start_serving(self, load: Callable[[], Awaitable[Any]],
                            timeout_s: float = _CONNECT_WAIT_S) -> None:
        """A front end's start: the reloads the engine process replays followed, then ``load``,
        then those made meanwhile (see :meth:`PeerReloads.start_serving`)."""
        await self.reloads.start_serving(load, timeout_s)

    def _lose(self, hold: Hold, exc: EngineError) -> None:
        """The engine process cannot load ``hold``'s folder (any more): no use of it here is
        left to count, and the categories it served are failed loads now, retried as such
        (the next connection, a newer export), rather than failing every category with the
        connection. Each retry stays one load a connection, with no tight loop."""
        log.error("engine process: cannot acquire %s again; its categories fail until it loads: %s",
                  hold.folder, exc)
        for category in self._holds.forget(hold):
            if self.on_lost is not None:
                self.on_lost(category, hold.folder, exc)

    def _disconnected(self) -> None:
        self._connected.clear()
        self.channel = None
        # Only a connection that stayed up resets the wait: one that ends soon after it was
        # made (an engine process dying while it loads) grows it, so no reconnect loop is tight.
        stable = self._up_since is not None and time.monotonic() - self._up_since >= _STABLE_AFTER_S
        self._up_since = None
        if stable:
            self._retry.reset()
        lost = EngineUnavailable("the engine process went away; retry")
        self.images.lost(lost, renew=not self._closing)
        for call in self._calls.values():
            if not call.done():
                call.set_exception(lost)
        self._calls.clear()
        if not self._closing:
            log.error("lost the engine process; reconnecting")
            self._connector = self.loop.create_task(self._connect_loop(pause_first=not stable),
                                                     name="engine-connect")

    def _send(self, message: Message) -> None:
        if self.channel is None:
            raise EngineUnavailable("the engine process is not connected; retry")
        self.channel.send(message)

    # ------------------------------------------------------------------ answers
    def _on_messages(self, batch: list[tuple[Incoming, list[int]]]) -> None:
        for message, fds in batch:
            for fd in fds:  # the engine process sends none; never keep one by accident
                os.close(fd)
            if isinstance(message, bytes):
                try:
                    if message[0] == frames.RESULT:
                        self.images.resolve(*frames.unpack_result(message))
                    else:
                        self.gathers.part(message)
                except frames.UNREADABLE:  # a bad JSON payload of a part too (a ValueError)
                    log.exception("unreadable frame from the engine process")
                continue
            op = message.get("op")
            if op in ("acquired", "error", "gathered"):
                call = self._calls.pop(int(message["rid"]), None)
                if call is not None and not call.done():
                    call.set_result(message)
                elif op == "error":  # a warm message it could not read
                    self.images.refused(int(message["rid"]), str(message.get("message")))
                elif op == "acquired":  # its caller gave up (cancelled): held there for nothing
                    self._unwanted(message)
            elif op == "reload":
                self.reloads.heard(message)
            elif op == "retired":
                self.reloads.peer_retired(message)
            elif op == "greeted":
                self.reloads.greeted()
            elif op == "collect":
                self.gathers.answer(self.channel, int(message["gid"]), str(message["topic"]),
                                    message.get("args") or {})

    # ------------------------------------------------------------------ calls
    async def _call(self, message: Message, require_connected: bool = True) -> Message:
        if require_connected and not self._connected.is_set():
            try:
                async with asyncio.timeout(_CONNECT_WAIT_S):  # not wait_for: 3.11 drops a cancellation then (gh-86296)
                    await self._connected.wait()
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

    def open_call(self, message: Message) -> tuple[int, asyncio.Future[Message]]:
        """Send ``message`` under a new request id, now; the engine process's answer to it
        resolves the future (until :meth:`close_call`). Raises :class:`EngineUnavailable`
        when not connected."""
        rid = next(self._ids)
        call = self._calls[rid] = self.loop.create_future()
        try:
            self._send({**message, "rid": rid})
        except BaseException:
            self.close_call(rid)
            raise
        return rid, call

    def close_call(self, rid: int) -> None:
        self._calls.pop(rid, None)

    async def acquire(self, version_dir: Path) -> tuple[Hold, Message]:
        """Have the engine process load (or share) what ``version_dir`` holds now and keep it
        for this front end, until :meth:`release` (a failed warm-up) or :meth:`swapped_in` of a
        newer version: what is held (which content of the folder), and the answer. Held once
        answered: one cut off before fails, and the engine process let go of it with the
        connection."""
        folder = str(version_dir)
        answer = await self._call({"op": "acquire", "dir": folder})
        hold = Hold(folder, str(answer.get("digest", "")))
        self._holds.take(hold)
        self.handles[hold] = int(answer["handle"])
        return hold, answer

    def swapped_in(self, hold: Hold) -> None:
        """The registry serves ``hold`` now: the version served before lets go of it
        (requests pinned to it still finish: the engine process unloads after a grace period).
        Not at :meth:`acquire`: until the warm-up succeeded, the version before still serves."""
        previous = self._holds.serve(Path(hold.folder).parent.name, hold)
        if previous is not None:
            self.release(previous)  # the same folder too: reloading it acquired it once more

    def stopped_serving(self, category: str, hold: Hold) -> None:
        """The registry no longer serves ``category`` with ``hold``, and nothing else in
        its place (a failed follow of a reload): that use of it ends, as at a swap."""
        if self._holds.unserve(category, hold):
            self.release(hold)

    def release(self, hold: Hold) -> None:
        """One user of ``hold`` fewer; the engine process hears when none is left."""
        if self._holds.drop(hold) and self._connected.is_set():
            self._let_go(hold)  # reconnecting: left out there

    def _let_go(self, hold: Hold) -> None:
        """Tell the engine process that nothing here uses ``hold``'s entry any more, unless
        another hold names the same one (a content replaced while this reconnected)."""
        handle = self.handles.get(hold)
        if handle is not None:
            self._release_unheld(hold.folder, handle)

    def _unwanted(self, answer: Message) -> None:
        """An acquire answered after its caller gave up: the engine process holds that entry
        for this front end, which lets go of it unless it holds it anyway."""
        self._release_unheld(str(answer.get("dir")), int(answer["handle"]))

    def _release_unheld(self, folder: str, handle: int) -> None:
        """Release the engine process's entry ``handle`` unless a hold here still names it."""
        if self.channel is not None and all(self.handles.get(h) != handle for h in self._holds.holds()):
            self.channel.send({"op": "release", "dir": folder, "handle": handle})

    # ------------------------------------------------------------------ between front ends
    def broadcast_reload(self, category: str, version: str | None) -> None:
        """Ask every other front end to reload ``category`` like this one did, those started
        later included (the engine process replays the last reload of each category)."""
        self.reloads.made(category, version)

    def retired(self, category: str) -> None:
        """The store watch retired ``category`` here (its folder left the store): the operator's
        last reload of it is no pin any more, here nor in the engine process, which replays it
        no more to front ends started later (else one started after the folder came back
        followed the old pin while the running ones served the newest). Each front end sends
        this on its own scans; the engine process relays the first to the others, whose pin
        ends too (see ``on_peer_retired``). Its slabs go once none of their slots is in flight
        or lent (:meth:`EngineImages.retire`)."""
        self.reloads.retired(category)
        self.images.retire(category)

    @property
    def collectors(self) -> dict[str, Callable[[Message], list[Any]]]:
        """topic -> what this front end answers when another one gathers (see :class:`Gathers`)."""
        return self.gathers.collectors

    async def collect(self, topic: str, args: Message) -> Collected:
        """Every other front end's ``collectors[topic](args)`` (see :meth:`Gathers.collect`)."""
        return await self.gathers.collect(topic, args)

    # ------------------------------------------------------------------ images
    def pool(self, category: str, size: int) -> SlotPool:
        """This front end's slots for ``category``'s inputs of ``size`` (see :class:`EngineImages`)."""
        return self.images.pool(category, size)

    async def run(self, category: str, hold: Hold, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One whole batch of ``category`` through the engine process (the registry's warm-up;
        see :meth:`EngineImages.run`)."""
        return await self.images.run(category, hold, images)

    # ------------------------------------------------------------------ for the registry (worker threads)
    def engine_factory(self, version_dir: Path, **_: Any) -> "RemoteEngine":
        """The registry's engine factory here (called in a worker thread, like load_engine).
        The manifest is the engine process's, of the engine that runs: a pinned version whose
        folder left the store is served on from its memory, as one process serves it on."""
        hold, answer = asyncio.run_coroutine_threadsafe(self.acquire(version_dir), self.loop).result()
        try:
            manifest = Manifest.model_validate(answer["manifest"])
        except (KeyError, ValueError) as exc:
            self.loop.call_soon_threadsafe(self.release, hold)
            raise EngineError(f"engine process: no readable manifest for {version_dir}: {exc}") from exc
        return RemoteEngine(self, version_dir, manifest, str(answer["name"]), int(answer["max_batch_size"]), hold)


def _flush_metrics(_: Message) -> list[Any]:
    """Another front end's scrape: this one's buffered metric values go to its files now."""
    flush_metrics()
    return []
