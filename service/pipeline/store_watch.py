"""What the store watch sees of the model store, and when something served has left it.

The registry (:mod:`service.pipeline.registry`) asks :func:`look` every ``store_poll_s`` and
decides what to load from it; :class:`Removals` decides what to let go of. Something leaves
the store only when the store says so: a category folder absent from a root that lists fine
(or one left with no complete version), or the served version's folder absent from a
category folder that lists fine. A root or a category that cannot be listed (an NFS hiccup:
an ``OSError``) says nothing, and starts the grace over. And something seen gone is acted on
only once it has been gone on every scan for ``store_removal_grace_s``: a folder replaced by
``rsync --delete``, or a volume remounting, comes back within a scan or two. A root that lists
no category at all while some are served says nothing either: an unmounted volume leaves its
mount point as an empty folder, and retiring every category of a line for that would stop the
line; an operator who means to stop serving everything stops the server.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from models.manifest import CATEGORY_PATTERN, MANIFEST, Manifest, ManifestError, is_numeric_version, version_folders

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreLook:
    """One scan of the store (``root``): each folder named like a category, with its complete
    versions (oldest first), or None where it could not be listed (unknown, not empty)."""

    root: Path
    categories: dict[str, list[str] | None] = field(default_factory=dict)
    # category -> version -> why its folder cannot be read (categories listed only): failed
    # versions the registry shows, said once (:func:`models.manifest.version_folders`).
    unreadable: dict[str, dict[str, str]] = field(default_factory=dict)

    def serveable(self) -> list[str]:
        """Categories holding a complete version, sorted."""
        return sorted(c for c, versions in self.categories.items() if versions)

    def versions(self, category: str) -> list[str] | None:
        """``category``'s complete versions: [] when its folder is absent, None when unknown."""
        return self.categories.get(category, [])


def look(store: Path) -> StoreLook:
    """Scan ``store``. Raises ``OSError`` when the root itself cannot be listed (the caller
    knows nothing this time); a category that cannot be listed is None in the answer."""
    found: dict[str, list[str] | None] = {}
    unreadable: dict[str, dict[str, str]] = {}
    for entry in store.iterdir():
        if not CATEGORY_PATTERN.fullmatch(entry.name):
            continue
        try:
            if entry.is_dir():
                found[entry.name], broken = version_folders(entry)
                if broken:
                    unreadable[entry.name] = broken
        except OSError as exc:
            log.warning("model store: cannot list %s (%s); looked at again on the next scan", entry, exc)
            found[entry.name] = None
    return StoreLook(store, found, unreadable)


def _known_absent(path: Path) -> bool:
    """True only when ``path`` is known not to exist: one this process may not read (a version
    folder with the wrong owner, which :func:`version_folders` lists as unreadable) is not known gone."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


# What a version folder held when it was tried: each entry's name, inode, size, mtime and ctime.
FolderState = tuple[tuple[str, int, int, int, int], ...]


def folder_state(version_dir: Path) -> FolderState | None:
    """What ``version_dir`` holds now, as far as loading it goes (None when it cannot be read).
    Dot files are left out: rsync's temporary file grows while it copies, and only its rename
    into place makes the folder loadable. The ctime is there for what fixes a file without
    writing it: a ``chmod``/``chown`` of a model the service's user could not read ("Permission
    denied"), or a copy whose mtime ``rsync -a``/``cp -p`` set back to the failed one's."""
    try:
        with os.scandir(version_dir) as entries:
            return tuple(sorted((e.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                                for e in entries if not e.name.startswith(".") for st in (e.stat(),)))
    except OSError:
        return None


class FailedVersion(NamedTuple):
    """A version that failed to load here: why (as an answer says it), and what its folder held
    when it was tried (:func:`folder_state`; None: it could not be read)."""

    why: str
    folder: FolderState | None


def still_failed(category_dir: Path, failed: Mapping[str, FailedVersion]) -> set[str]:
    """The versions of ``failed`` whose folder has not changed since: the watch does not try
    them again. One that changed is tried again: a folder caught half copied (rsync lands
    ``manifest.json`` before ``model.onnx``), or a broken export removed and exported again
    under its number."""
    return set(failed) - set(changed_since(category_dir, failed))


def changed_since(category_dir: Path, failed: Mapping[str, FailedVersion]) -> dict[str, FailedVersion]:
    """The records of ``failed`` whose folder has changed since (a scan reads them in its
    thread; :func:`failed_now` then tells a failure recorded after the scan from the one the
    scan found changed)."""
    return {version: record for version, record in failed.items()
            if folder_state(category_dir / version) != record.folder}


def failed_now(failed: Mapping[str, FailedVersion], changed: Mapping[str, FailedVersion]) -> set[str]:
    """The versions of ``failed`` the watch skips, given what a scan found ``changed``: all but
    those whose record is the very one the scan found changed (a version that failed again
    after the scan's look has a new record: skipped until the next scan looks)."""
    return {version for version, record in failed.items() if changed.get(version) is not record}


# A manifest.json as a scan sees it without reading it: inode, size, mtime and ctime.
ManifestKey = tuple[int, int, int, int]


def manifest_key(version_dir: Path) -> ManifestKey | None:
    """The stat of ``version_dir``'s manifest (None: absent or unreadable, which says nothing)."""
    try:
        st = os.stat(version_dir / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def served_replaced(version_dir: Path, served: Manifest, seen: ManifestKey | None) -> tuple[ManifestKey | None, bool]:
    """Whether ``version_dir`` now holds another version than the one served from it
    (``served``'s manifest), and its manifest's key. The store's versions are never written in
    place (export and recalibrate rename a whole folder in), so another manifest under the
    served number is a folder replaced: a category deleted and exported again (numbered 1
    again), a copy over it. ``seen``: a key already found to need nothing (not read again).
    A manifest that does not parse is a replacement under way (tried, fails, and is tried
    again once its folder changes); one that cannot be stat'ed or read says nothing."""
    key = manifest_key(version_dir)
    if key is None or key == seen:
        return key, False
    try:
        now = Manifest.read(version_dir)
    except ManifestError:
        return key, True
    except OSError:
        return key, False
    return key, now != served


def version_order(version: str) -> tuple[int, int, str]:
    """The order :func:`models.manifest.list_versions` sorts versions in (numeric ones numerically)."""
    return (0, int(version), "") if is_numeric_version(version) else (1, 0, version)


def watch_candidates(versions: list[str], served: str | None, failed: Iterable[str],
                     served_gone: bool = False, served_replaced: bool = False) -> list[str]:
    """The versions the watch tries for a category, newest first, until one loads: those newer
    than the one ``served`` (all of them when none is), less those that ``failed`` before
    (and have not changed since: :func:`still_failed`).
    ``served_gone``: the served version has left the store for the grace period, so the older
    ones are tried too (the newest that loads replaces it); until then only newer ones are.
    ``served_replaced``: the served version's folder holds another version now
    (:func:`served_replaced`): it is tried too, after the newer ones."""
    skipped = set(failed)
    out = []
    for version in reversed(versions):
        if served is not None and not served_gone and version_order(version) <= version_order(served):
            if served_replaced and version == served and version not in skipped:
                out.append(version)
            break  # served already, or older than what serves
        if version not in skipped:
            out.append(version)
    return out


@dataclass(frozen=True)
class Served:
    """What the registry serves a category with, as far as removals go."""

    version: str
    pinned: bool


@dataclass
class Gone:
    """What one scan found to have left the store for the whole grace period."""

    categories: list[str] = field(default_factory=list)  # to retire: absent, or no complete version left
    versions: set[str] = field(default_factory=set)  # categories whose served version is gone: fall back


class Removals:
    """When each thing served was first seen gone, over consecutive scans. ``grace_s`` < 0:
    nothing is ever let go of (a removal serves on from memory until a restart)."""

    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.clock = clock
        self._since: dict[tuple[str, str], float] = {}  # (category, "" or the served version) -> first seen gone
        self._said_empty = False

    def unknown(self) -> None:
        """A scan that could not list the root: nothing is known gone, the grace starts over."""
        self._since.clear()

    def check(self, seen: StoreLook, known: Iterable[str], served: Mapping[str, Served],
              pins: Iterable[str]) -> Gone:
        """What of the ``known`` categories (``served`` with a version, ``pins`` held to one)
        has been gone from the store for the grace period, by this scan."""
        now, gone, pinned, known = self.clock(), Gone(), set(pins), list(known)
        if known and not seen.categories:
            if not self._said_empty:
                log.warning("model store %s lists no category while %s are served: an unmounted volume? "
                            "Nothing is let go of while it stays empty", seen.root, ", ".join(known))
            self._said_empty = True
            self.unknown()
            return gone
        self._said_empty = False
        # Only what this scan found gone stays timed: the grace spans consecutive scans.
        before, self._since = self._since, {}
        for category in known:
            versions = seen.versions(category)
            if versions is None:  # could not be listed: says nothing, the grace starts over
                continue
            model = served.get(category)
            held = model.pinned if model is not None else category in pinned
            # Absent; or left with no complete version and no pin (a pin holds its category
            # while its version cannot be served, as before).
            category_gone = category not in seen.categories or (not versions and not held)
            if category_gone and self._gone_long_enough((category, ""), before, now):
                gone.categories.append(category)
                continue
            if model is None:
                continue
            version_gone = (not category_gone and not model.pinned and model.version not in versions
                            and _known_absent(seen.root / category / model.version / MANIFEST))
            if version_gone and self._gone_long_enough((category, model.version), before, now):
                gone.versions.add(category)
        return gone

    def _gone_long_enough(self, key: tuple[str, str], before: dict[tuple[str, str], float], now: float) -> bool:
        since = self._since[key] = before.get(key, now)
        return self.grace_s >= 0 and now - since >= self.grace_s


__all__ = ["FailedVersion", "FolderState", "Gone", "ManifestKey", "Removals", "Served", "StoreLook", "changed_since",
           "failed_now", "folder_state", "look", "manifest_key", "served_replaced", "still_failed", "version_order",
           "watch_candidates"]
