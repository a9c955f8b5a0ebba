"""Which model versions a front end needs the engine process to keep (multi-process mode).

A front end uses a version folder while its registry serves it, and while a reload warms it
up; one folder can be both (a reload of the version served). The engine process keeps a
folder for a front end or not, a set per folder with nothing to count, so nothing drifts
when a front end goes away; the front end counts its own users and lets go once, when the
last one is gone. The version served before a reload loses its use at the registry's swap,
never at the acquire: a reload whose warm-up fails leaves that version serving, and held.

What is held is a :class:`Hold`: a folder and the digest of the manifest the engine process
loaded from it (its acquire's answer), since a folder replaced under its number (a category
exported again) is another entry there: the front end serving the content loaded before
keeps that one, and lets go of it alone, once the new content serves.
"""

from __future__ import annotations

import collections
from typing import NamedTuple


class Hold(NamedTuple):
    folder: str  # the version folder
    digest: str  # of the manifest the engine process loaded from it


class VersionHolds:
    """Users per :class:`Hold`, and the one each category serves."""

    def __init__(self) -> None:
        self._users: collections.Counter[Hold] = collections.Counter()
        self._served: dict[str, Hold] = {}  # category -> the hold serving it

    def holds(self) -> list[Hold]:
        """Every hold in use here (what a new engine process must be asked for again)."""
        return list(self._users)

    def __contains__(self, hold: Hold) -> bool:
        return hold in self._users

    def take(self, hold: Hold) -> None:
        """One user more (an acquire, once answered)."""
        self._users[hold] += 1

    def drop(self, hold: Hold) -> bool:
        """One user fewer; True when that was the last (the engine process may unload it)."""
        if hold not in self._users:
            return False
        self._users[hold] -= 1
        if self._users[hold] > 0:
            return False
        del self._users[hold]
        return True

    def forget(self, hold: Hold) -> list[str]:
        """``hold`` is no use here any more, however many users it had (the engine process
        cannot load it): the categories it served, which serve nothing here now. The users'
        own drops later find nothing to drop."""
        self._users.pop(hold, None)
        lost = [category for category, served in self._served.items() if served == hold]
        for category in lost:
            del self._served[category]
        return lost

    def serve(self, category: str, hold: Hold) -> Hold | None:
        """``hold`` serves ``category`` now (it was taken when acquired); the hold served
        before, whose use ends here and which the caller drops, even when it is the same."""
        previous = self._served.get(category)
        self._served[category] = hold
        return previous

    def unserve(self, category: str, hold: Hold) -> bool:
        """``hold`` no longer serves ``category``, with nothing in its place (the registry
        dropped it): True if it did, its use ended here, which the caller drops."""
        if self._served.get(category) != hold:
            return False
        del self._served[category]
        return True
