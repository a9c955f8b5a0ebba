"""An operator's reload on one front end, followed by every other one (multi-process mode).

The engine process relays a reload to the other front ends as it happens and replays the
last one of each category to every front end that connects (:mod:`service.engine_core.relay`);
each front end records the last one it made or followed, so that a reload heard again is
followed once, and hands its record to a new engine process at the handshake.
"""

from __future__ import annotations

import time

from service.ipc.channel import Message


class ReloadRecord:
    """``latest``: category -> (stamp, version) of the last operator reload made or followed here."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, str | None]] = {}

    def made(self, category: str, version: str | None) -> Message:
        """This front end reloaded ``category``: the message that has the others follow."""
        stamp = max(time.time_ns(), self.latest.get(category, (0, None))[0] + 1)  # after what it replaces
        self.latest[category] = (stamp, version)
        return reload_message(category, version, stamp)

    def heard(self, category: str, version: str | None, stamp: int, replayed: bool) -> bool:
        """Another front end's reload, relayed as it happens or ``replayed`` to this one when
        it connects: whether to follow it (once). A replayed reload of the newest version (no
        pin) where this front end knew of none is only recorded: it serves what that reload
        chose since it started."""
        known = self.latest.get(category)
        if known is not None and known[0] >= stamp:
            return False
        self.latest[category] = (stamp, version)
        return known is not None or version is not None or not replayed

    def messages(self) -> list[Message]:
        """The record, for a new engine process (it keeps the newest of each category)."""
        return [reload_message(category, version, stamp) for category, (stamp, version) in self.latest.items()]


def reload_message(category: str, version: str | None, stamp: int) -> Message:
    """``stamp``: when the operator's reload was made (ns, this host's wall clock, which every
    process of a server shares): the newest reload of a category wins everywhere."""
    return {"op": "reload", "category": category, "version": version, "stamp": stamp}
