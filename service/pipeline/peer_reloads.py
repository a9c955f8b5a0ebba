"""An operator's reload on one front end, followed by every other one (multi-process mode).

The engine process relays a reload to the other front ends as it happens and replays the
last one of each category to every front end that connects (:mod:`service.engine_core.relay`);
each front end records the last one it made or followed, so that a reload heard again is
followed once, and hands its record to a new engine process at the handshake.

A category the store watch retires here takes its record with it (:meth:`ReloadRecord.retired`):
the engine process hears it (``retired``, with the stamp of the reload dropped) and replays
that reload no more, and a new engine process hears it again at the handshake. It relays a
retirement to the other front ends, whose pin of that reload ends too (:meth:`ReloadRecord.peer_retired`).

:class:`PeerReloads` is a front end's side, held by its
:class:`~service.pipeline.engine_client.EngineClient`: the reloads it makes and retires sent,
those it hears followed (once; before it serves, all of those replayed at its start), and a
pin it followed ended when another front end retires the category.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from service.ipc.channel import Channel, Message

log = logging.getLogger("service.pipeline.engine_client")  # the client's log, as before the split


class ReloadRecord:
    """``latest``: category -> (stamp, version) of the last operator reload made or followed here."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, str | None]] = {}
        # category -> the stamp of the reload its retirement dropped here (told to every new
        # engine process, which may have been started from a record that still holds it).
        self.dropped: dict[str, int] = {}

    def made(self, category: str, version: str | None) -> Message:
        """This front end reloaded ``category``: the message that has the others follow."""
        # After what it replaces, and after a pin its retirement dropped: the engine process
        # refuses a reload up to that stamp (from before the retirement), and a pin stamped
        # ahead of this clock (another process's, before a clock step back) would outlast it.
        stamp = max(time.time_ns(), self.latest.get(category, (0, None))[0] + 1, self.dropped.get(category, 0) + 1)
        self.latest[category] = (stamp, version)
        self.dropped.pop(category, None)  # newer than anything a retirement dropped
        return reload_message(category, version, stamp)

    def heard(self, category: str, version: str | None, stamp: int, replayed: bool) -> bool:
        """Another front end's reload, relayed as it happens or ``replayed`` to this one when
        it connects: whether to follow it (once). A replayed reload of the newest version (no
        pin) where this front end knew of none is only recorded: it serves what that reload
        chose since it started."""
        known = self.latest.get(category)
        if known is not None and known[0] >= stamp or self.dropped.get(category, -1) >= stamp:
            return False  # followed already, or from before the category was retired here
        self.latest[category] = (stamp, version)
        self.dropped.pop(category, None)
        return known is not None or version is not None or not replayed

    def retired(self, category: str) -> Message | None:
        """The store watch retired ``category`` here: its record goes, and the message that
        has the engine process drop it too (None when no reload of it was known here)."""
        known = self.latest.pop(category, None)
        if known is None:
            return None
        self.dropped[category] = known[0]
        return retired_message(category, known[0])

    def peer_retired(self, category: str, stamp: int) -> bool:
        """Another front end's store watch retired ``category``, whose last reload it knew by
        ``stamp`` (relayed by the engine process): whether the pin recorded here is that one
        (or older) and ends, as it did there. A reload newer than ``stamp`` (an operator's, after
        the folder came back) stays; heard again, nothing ends twice."""
        known = self.latest.get(category)
        if known is None or known[0] > stamp:
            return False
        del self.latest[category]
        self.dropped[category] = max(stamp, self.dropped.get(category, 0))
        return True

    def messages(self) -> list[Message]:
        """The record, for a new engine process (it keeps the newest of each category), and
        what retirements dropped from it (it drops them too, idempotently)."""
        return ([reload_message(category, version, stamp) for category, (stamp, version) in self.latest.items()]
                + [retired_message(category, stamp) for category, stamp in self.dropped.items()])


def reload_message(category: str, version: str | None, stamp: int) -> Message:
    """``stamp``: when the operator's reload was made (ns, this host's wall clock, which every
    process of a server shares): the newest reload of a category wins everywhere."""
    return {"op": "reload", "category": category, "version": version, "stamp": stamp}


def retired_message(category: str, stamp: int) -> Message:
    """A front end's store watch retired ``category``, whose last reload it knew by ``stamp``
    (also how the engine process's file keeps a reload it dropped)."""
    return {"op": "retired", "category": category, "stamp": stamp}


class Client(Protocol):
    """What :class:`PeerReloads` needs of the :class:`~service.pipeline.engine_client.EngineClient`
    (a protocol, not an import: the client module imports this one): its connection, its loop,
    and the owner's hooks that follow a reload (``on_reload``) and end a pin (``on_peer_retired``)."""

    channel: Channel | None
    on_reload: Callable[[str, str | None], Awaitable[Any]] | None
    on_peer_retired: Callable[[str, Callable[[], bool]], Awaitable[Any]] | None

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...


class PeerReloads:
    """A front end's side of the operator's reloads between front ends (module docstring)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        # What a reload heard again is checked against (followed once), and what a new engine
        # process learns at the handshake (it replays it to front ends that start later).
        self.record = ReloadRecord()
        # The first connection's greeting (the engine process's replay of the last reloads)
        # has come; the reloads followed before this front end serves, which its start waits
        # for (start_serving).
        self._greeted = asyncio.Event()
        self._catching_up: list[asyncio.Task[Any]] = []
        self._serving = False
        self._ending_pins: set[asyncio.Task[Any]] = set()  # held until done (the loop keeps weak references)

    async def start_serving(self, load: Callable[[], Awaitable[Any]], timeout_s: float) -> None:
        """A front end's start: wait for the first connection's greeting, follow what it
        replayed, then ``load`` (the registry's start-up load, which leaves a category a
        followed pin serves), then follow what other front ends reloaded meanwhile. Before, a
        front end started after an operator's reload ?version= (a killed one's replacement),
        or during one, listened serving the newest version and followed the pin a warm-up
        later. Without a connection within ``timeout_s`` it loads anyway; the replay is
        followed when it comes."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._greeted.wait()
        except TimeoutError:
            log.error("no greeting from the engine process within %.0f s; loading without the "
                      "operator's last reloads (followed once it connects)", timeout_s)
        await self._follow_caught_up()
        await load()
        await self._follow_caught_up()
        self._serving = True  # later reloads are followed while serving, as the other front ends do

    async def _follow_caught_up(self) -> None:
        while self._catching_up:
            following, self._catching_up = self._catching_up, []
            await asyncio.gather(*following, return_exceptions=True)  # a failure to follow is logged there

    def greeted(self) -> None:
        """The engine process has replayed the last reloads to this front end."""
        self._greeted.set()

    def heard(self, message: Message) -> None:
        """Another front end's reload (``reload``), relayed or replayed: followed once, through
        the owner's ``on_reload``; before this front end serves, :meth:`start_serving` waits for it."""
        category, version = str(message["category"]), message.get("version")
        if self.record.heard(category, version, int(message["stamp"]), bool(message.get("replayed"))) \
                and self._client.on_reload is not None:
            follow = self._client.loop.create_task(self._client.on_reload(category, version))
            if not self._serving:
                self._catching_up.append(follow)

    def peer_retired(self, message: Message) -> None:
        """Another front end's store watch retired a category (``retired``): the pin recorded
        here for it ends through the owner's ``on_peer_retired``, if it is that one."""
        category = str(message["category"])
        on_peer_retired = self._client.on_peer_retired
        if self.record.peer_retired(category, int(message["stamp"])) and on_peer_retired is not None:
            # Still that pin when it ends (under the category's lock): no reload made or followed since.
            end = self._client.loop.create_task(on_peer_retired(category, lambda: category not in self.record.latest))
            self._ending_pins.add(end)
            end.add_done_callback(self._ending_pins.discard)

    def made(self, category: str, version: str | None) -> None:
        """This front end reloaded ``category``: every other one follows, those started later
        included (the engine process replays the last reload of each category)."""
        message = self.record.made(category, version)
        if self._client.channel is not None:  # else sent at the handshake, with the record
            self._client.channel.send(message)

    def retired(self, category: str) -> None:
        """The store watch retired ``category`` here: the operator's last reload of it is no pin
        any more, here nor in the engine process (see ``EngineClient.retired``)."""
        message = self.record.retired(category)
        if message is not None and self._client.channel is not None:  # else sent at the handshake, with the record
            self._client.channel.send(message)
