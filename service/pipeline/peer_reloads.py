"""An operator's reload on one front end, followed by every other one (multi-process mode).

The engine process relays a reload to the other front ends as it happens and replays the
last one of each category to every front end that connects (:mod:`service.engine_core.relay`);
each front end records the last one it made or followed, so that a reload heard again is
followed once, and hands its record to a new engine process at the handshake.

A category the store watch retires here takes its record with it (:meth:`ReloadRecord.retired`):
the engine process hears it (``retired``, with the stamp of the reload dropped) and replays
that reload no more, and a new engine process hears it again at the handshake. It relays a
retirement to the other front ends, whose pin of that reload ends too (:meth:`ReloadRecord.peer_retired`).
"""

from __future__ import annotations

import time

from service.ipc.channel import Message


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
