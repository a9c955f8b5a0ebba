"""Which model versions a front end needs the engine process to keep (multi-process mode).

A front end uses a version folder while its registry serves it, and while a reload warms it
up; one folder can be both (a reload of the version served). The engine process keeps a
folder for a front end or not, a set per folder with nothing to count, so nothing drifts
when a front end goes away; the front end counts its own users and lets go once, when the
last one is gone. The version served before a reload loses its use at the registry's swap,
never at the acquire: a reload whose warm-up fails leaves that version serving, and held.
"""

from __future__ import annotations

import collections


class VersionHolds:
    """Users per version folder, and the folder each category serves."""

    def __init__(self) -> None:
        self._users: collections.Counter[str] = collections.Counter()
        self._served: dict[str, str] = {}  # category -> version folder

    def folders(self) -> list[str]:
        """Every folder in use here (what a new engine process must be asked for again)."""
        return list(self._users)

    def __contains__(self, folder: str) -> bool:
        return folder in self._users

    def take(self, folder: str) -> None:
        """One user more (an acquire, before it is answered)."""
        self._users[folder] += 1

    def drop(self, folder: str) -> bool:
        """One user fewer; True when that was the last (the engine process may unload it)."""
        if folder not in self._users:
            return False
        self._users[folder] -= 1
        if self._users[folder] > 0:
            return False
        del self._users[folder]
        return True

    def forget(self, folder: str) -> list[str]:
        """``folder`` is no use here any more, however many users it had (the engine process
        cannot load it): the categories it served, which serve nothing here now. The users'
        own drops later find nothing to drop."""
        self._users.pop(folder, None)
        lost = [category for category, served in self._served.items() if served == folder]
        for category in lost:
            del self._served[category]
        return lost

    def serve(self, category: str, folder: str) -> str | None:
        """``folder`` serves ``category`` now (it was taken when acquired); the folder served
        before, whose use ends here and which the caller drops, even when it is the same."""
        previous = self._served.get(category)
        self._served[category] = folder
        return previous

    def unserve(self, category: str, folder: str) -> bool:
        """``folder`` no longer serves ``category``, with nothing in its place (the registry
        dropped it): True if it did, its use ended here, which the caller drops."""
        if self._served.get(category) != folder:
            return False
        del self._served[category]
        return True
