"""Which model versions a front end needs the engine process to keep (multi-process mode).

A front end uses a version folder while its registry serves it, and while a reload warms it
up; one folder can be both (a reload of the version served). The engine process keeps a
folder for a front end or not, a set per folder with nothing to count, so nothing drifts
when a front end goes away; the front end counts its own users and lets go once, when the
last one is gone. The version served before a reload loses its use at the registry's swap,
never at the acquire: a reload whose warm-up fails leaves that version serving, and held.

What is held is a :data:`Hold`: a folder and the digest of the manifest the engine process
loaded from it (its acquire's answer), since a folder replaced under its number (a category
exported again) is another entry there: the front end serving the content loaded before
keeps that one, and lets go of it alone, once the new content serves.
"""

from __future__ import annotations

import collections

# (version folder, the digest of the manifest the engine process loaded from it)
Hold = tuple[str, str]


class VersionHolds:
    """Users per version folder (its :data:`Hold`), and the one each category serves."""

    def __init__(self) -> None:
        self._users: collections.Counter[Hold] = collections.Counter()
        self._served: dict[str, Hold] = {}  # category -> version folder

    def folders(self) -> list[Hold]:
        """Every folder in use here (what a new engine process must be asked for again)."""
        return list(self._users)

    def __contains__(self, folder: Hold) -> bool:
        return folder in self._users

    def take(self, folder: Hold) -> None:
        """One user more (an acquire, once answered)."""
        self._users[folder] += 1

    def drop(self, folder: Hold) -> bool:
        """One user fewer; True when that was the last (the engine process may unload it)."""
        if folder not in self._users:
            return False
        self._users[folder] -= 1
        if self._users[folder] > 0:
            return False
        del self._users[folder]
        return True

    def forget(self, folder: Hold) -> list[str]:
        """``folder`` is no use here any more, however many users it had (the engine process
        cannot load it): the categories it served, which serve nothing here now. The users'
        own drops later find nothing to drop."""
        self._users.pop(folder, None)
        lost = [category for category, served in self._served.items() if served == folder]
        for category in lost:
            del self._served[category]
        return lost

    def serve(self, category: str, folder: Hold) -> Hold | None:
        """``folder`` serves ``category`` now (it was taken when acquired); the folder served
        before, whose use ends here and which the caller drops, even when it is the same."""
        previous = self._served.get(category)
        self._served[category] = folder
        return previous

    def unserve(self, category: str, folder: Hold) -> bool:
        """``folder`` no longer serves ``category``, with nothing in its place (the registry
        dropped it): True if it did, its use ended here, which the caller drops."""
        if self._served.get(category) != folder:
            return False
        del self._served[category]
        return True
