"""What every front end holds, gathered on demand (multi-process mode): an admin's view, such
as the recent scores (:mod:`service.pipeline.recent`), asks when it is read, so no image pays.

A front end sends ``gather`` to the engine process, which asks every other front end
(``collect``) and relays their ``part`` frames back unparsed (:mod:`service.engine_core.relay`);
this module is both sides in a front end: the one that asks and the one that answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.ipc import frames
from service.ipc.channel import Channel, Message
from service.pipeline.engine_errors import EngineUnavailable

log = logging.getLogger(__name__)

_GATHER_WAIT_S = 5.0  # the engine process answers a gather within 2 s (engine_core.relay.GATHER_TIMEOUT_S)
_PART_ITEMS = 1000  # items per part frame: a collector's items are small, so a frame stays near a MB


@dataclass
class Collected:
    """What the other front ends answered to a gather: their items, and how many of them
    answered of those the engine process asked (fewer: one was stuck or went away)."""

    items: list[Any]
    asked: int
    answered: int


class Caller(Protocol):
    """What a gather needs of the :class:`~service.pipeline.engine_client.EngineClient` (a
    protocol, not an import: the client module imports this one)."""

    def open_call(self, message: Message) -> tuple[int, asyncio.Future[Message]]: ...

    def close_call(self, rid: int) -> None: ...


class Gathers:
    """``collectors``: topic -> what this front end answers when another one gathers (called
    on the loop, with the gather's args; a list of JSON-able items), e.g. "recent"."""

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self.collectors: dict[str, Callable[[Message], list[Any]]] = {}
        self._gathering: dict[int, list[Any]] = {}  # this front end's gathers in progress -> items so far

    async def collect(self, topic: str, args: Message) -> Collected:
        """Every other front end's ``collectors[topic](args)``, through the engine process (not
        this one's: the caller has it). Raises :class:`EngineUnavailable` without an answer."""
        rid, call = self._caller.open_call({"op": "gather", "topic": topic, "args": args})
        items = self._gathering[rid] = []  # before the answer: none comes before this returns to the loop
        try:
            async with asyncio.timeout(_GATHER_WAIT_S):
                answer = await call
        except TimeoutError:
            raise EngineUnavailable(f"the engine process did not answer a gather within {_GATHER_WAIT_S:.0f} s") \
                from None
        finally:
            self._caller.close_call(rid)
            self._gathering.pop(rid, None)
        return Collected(items, int(answer["asked"]), int(answer["answered"]))

    def part(self, frame: bytes) -> None:
        """Part of another front end's answer to a gather of this one's."""
        rid, _, payload = frames.unpack_part(frame)
        items = self._gathering.get(rid)
        if items is not None:  # else the gather ended (timed out) before it
            items.extend(json.loads(payload))

    def answer(self, channel: Channel | None, gid: int, topic: str, args: Message) -> None:
        """Another front end gathers: this one's items, in parts (the last one marked, even
        when there is none: the engine process waits for it)."""
        collector = self.collectors.get(topic)
        try:
            items = collector(args) if collector is not None else []
        except Exception:  # this front end's share is left out, the gather still ends
            log.exception("collecting %s for another front end failed", topic)
            items = []
        if channel is None:
            return
        for start in range(0, max(1, len(items)), _PART_ITEMS):
            chunk = json.dumps(items[start:start + _PART_ITEMS], separators=(",", ":")).encode()
            channel.send_frame(frames.pack_part(gid, start + _PART_ITEMS >= len(items), chunk))
