"""What a review store holds, read from its item ids once and kept between calls.

The store answers its budget, duplicate check, pending counts and retention from the item
ids alone (one ``scandir`` per category, no file read: :mod:`models.review_store`). Read
afresh on every call, that cost a server dearly: at 10,000 items one scan took ~110 ms of
CPU holding the GIL (``strptime`` on every id), a capture made four of them and the gauges'
refresh after it read every label too: ~0.77 s of CPU per captured image once the store was
full, and a server auditing 2% of its answers fell from 660 to 317 images/s
(docs/performance-log.md).

:class:`StoreIndex` keeps, per category, a :class:`CategoryScan` snapshot (entries oldest
first, labelled ids, the digests and the bytes they add up to) with the ``stat`` of the two
directories it was read from, and hands it out while those are unchanged. A snapshot is
never changed in place: a reader keeps a consistent one however the store moves on.

* This process's own writes, made under the store's lock (so no other writer moves the
  items meanwhile), replace the snapshot and take the directory's new ``stat``: no rescan.
  The write builds on the snapshot the writer itself read under the lock, never on whatever
  is held by then: an API thread's reading that began before another process added an item
  may be kept while the lock is held, and that listing stamped with the folder's new
  ``stat`` would hide the item for :data:`MAX_AGE_S` (its bytes uncounted, its duplicate
  missed, its label swept as an orphan). If the held snapshot is no longer the writer's,
  it is dropped and the next call reads the folder.
* A snapshot never replaces one whose ``stat`` was taken later (each reading takes a ticket
  before its ``stat``): a slow reader's old listing does not overwrite a newer one.
* This process's own labels (written under the lock too) are read into the snapshot with the
  labels directory's new ``stat``: where timestamps are coarse the directory's ``stat`` came
  out as before, and the item just labelled stayed pending for up to :data:`MAX_AGE_S`.
* Any other change (another replica or worker, an operator deleting files) changes a
  directory's ``stat``, and the next call reads that directory again.
* The ``stat`` is taken *before* the directory is read, so a change racing a read leaves a
  snapshot that looks stale and is read again, never one that looks current and is not.
* Every snapshot is read afresh at least every :data:`MAX_AGE_S`: on a file system whose
  timestamps are coarse (and whose directories' link counts stay 1, as btrfs's), another
  process's change within the same tick as one of this process's could otherwise go unseen.

:class:`LabelCache` does the same for label files (each replaced atomically on relabel): a
label is parsed again only when its file's ``stat`` changed, and none is looked at while the
snapshot's labelled set is the same.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Generic, TypeVar

from models.review_leftovers import staging_bytes

ID_PATTERN = re.compile(r"^(\d{8}T\d{12})-(ok|review|ng)-(\d{10})-([0-9a-f]{12})$")
MAX_AGE_S = 10.0  # the longest a snapshot is trusted without reading its directories again
# Ids whose parse is remembered: ~0.4 KB each with the id and the cache's own (13 MB at most),
# three times the default budget of 10,000 items (a larger store parses the rest each time).
PARSED_IDS = 32_768

_T = TypeVar("_T")
_Stat = tuple[int, int, int, int] | None  # a directory's (inode, mtime ns, links, size); None: absent


@dataclass(frozen=True, slots=True)
class Entry:
    """What an item's id says, without reading it."""

    id: str
    captured: float  # epoch seconds
    verdict: str
    bytes: int
    digest: str  # image sha256[:12]


@functools.lru_cache(maxsize=PARSED_IDS)
def parse_id(item_id: str) -> Entry | None:
    """The entry an item id names, or None for anything else. Remembered: an id never
    changes meaning, and every scan of a store parses all of its ids."""
    m = ID_PATTERN.fullmatch(item_id)
    if m is None:
        return None
    s = m.group(1)  # yyyymmddTHHMMSSffffff, UTC
    try:
        captured = datetime(int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[9:11]), int(s[11:13]), int(s[13:15]),
                            int(s[15:21]), tzinfo=timezone.utc).timestamp()
    except ValueError:  # a month 13, a second 61: not an id this store wrote
        return None
    return Entry(item_id, captured, m.group(2), int(m.group(3)), m.group(4))


@dataclass(frozen=True)
class CategoryScan:
    """One category's items as of one reading (or one write of this process). Read-only."""

    entries: tuple[Entry, ...] = ()  # oldest first (ids sort by capture time)
    labelled: frozenset[str] = frozenset()
    digests: frozenset[str] = frozenset()  # the entries' image digests
    bytes: int = 0  # what the entries count against the budget, as their ids say
    staging: int = 0  # bytes in the items' staging folders (models.review_leftovers): counted until swept

    @classmethod
    def of(cls, entries: Iterable[Entry], labelled: frozenset[str], staging: int = 0) -> "CategoryScan":
        kept = tuple(entries)
        return cls(kept, labelled, frozenset(e.digest for e in kept), sum(e.bytes for e in kept), staging)

    @property
    def pending(self) -> list[Entry]:
        return [e for e in self.entries if e.id not in self.labelled]


@dataclass(frozen=True)
class _Held:
    scan: CategoryScan
    items_stat: _Stat
    labels_stat: _Stat
    read_at: float  # clock() of the last full reading of the items
    ticket: int  # taken before the stat: a higher one's stat (and content) is newer


class StoreIndex:
    """Snapshots of the categories of the store at ``root``. Thread-safe: the service reads
    from the API's threads while its review thread writes."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._tickets = itertools.count()  # next() is atomic under the GIL

    def scan(self, category: str) -> CategoryScan:
        """The category as it is on disk (as fresh as the module docstring says)."""
        items_dir, labels_dir = self.root / category / "items", self.root / category / "labels"
        ticket = next(self._tickets)
        items_stat, labels_stat = _stat(items_dir), _stat(labels_dir)  # before reading: see the docstring
        with self._lock:
            held = self._held.get(category)
        now = self._clock()
        if held is not None and held.items_stat == items_stat and now - held.read_at < MAX_AGE_S:
            if held.labels_stat == labels_stat:
                return held.scan
            scan = dataclasses.replace(held.scan, labelled=_labelled(labels_dir))
            self._keep(category, _Held(scan, items_stat, labels_stat, held.read_at, ticket))
            return scan
        names = _names(items_dir)
        entries = sorted((e for e in map(parse_id, names) if e is not None), key=lambda e: e.id)
        scan = CategoryScan.of(entries, _labelled(labels_dir), staging_bytes(items_dir, names))
        self._keep(category, _Held(scan, items_stat, labels_stat, now, ticket))
        return scan

    def added(self, category: str, entry: Entry, base: CategoryScan) -> None:
        """This process put ``entry`` in place, holding the store's lock; ``base`` is the
        snapshot it read under that lock before writing."""
        def change(scan: CategoryScan) -> CategoryScan:
            if entry.digest in scan.digests:  # add() refuses a digest held: a reading racing it saw this one
                return scan
            if not scan.entries or scan.entries[-1].id < entry.id:  # the newest, as nearly always
                entries = (*scan.entries, entry)
            else:
                at = bisect.bisect_left([e.id for e in scan.entries], entry.id)
                entries = (*scan.entries[:at], entry, *scan.entries[at:])
            return dataclasses.replace(scan, entries=entries, digests=scan.digests | {entry.digest},
                                       bytes=scan.bytes + entry.bytes)
        self._after_write(category, change, base, reread_labels=False)

    def labels_written(self, category: str, base: CategoryScan) -> None:
        """This process wrote (or took back) a label, holding the store's lock; ``base`` is
        the snapshot it read under that lock before writing."""
        self._after_write(category, lambda scan: scan, base, reread_labels=True, items_changed=False)

    def removed(self, category: str, ids: set[str], base: CategoryScan) -> None:
        """This process removed these items and their labels, holding the store's lock;
        ``base`` is the snapshot it read under that lock before removing them."""
        if ids:
            self._after_write(category, lambda scan: CategoryScan.of(
                (e for e in scan.entries if e.id not in ids), scan.labelled, scan.staging), base, reread_labels=True)

    def forget(self) -> None:
        """Read every category from disk next time."""
        with self._lock:
            self._held.clear()

    def _after_write(self, category: str, change: Callable[[CategoryScan], CategoryScan], base: CategoryScan,
                     reread_labels: bool, items_changed: bool = True) -> None:
        ticket = next(self._tickets)
        with self._lock:
            held = self._held.get(category)
            if held is not None and held.scan is not base:
                # Another thread kept a reading since the writer read ``base``: which items it
                # saw is unknown (it may have begun before another process's write), so it
                # cannot take this write's stat. Dropped: the next scan reads the directories.
                del self._held[category]
                return
        if held is None:
            return  # nothing held: the next scan reads the directories
        folder = self.root / category
        # Under the store's lock nobody else moves items, so the directory's stat now is the
        # stat of exactly ``base`` changed by this write, and labels are written under it too:
        # read them again where this write changed some (a new set, so that a relabel's file is
        # parsed again, :class:`LabelCache`), else keep what was held. Items this write did not
        # move keep the stat ``base`` was read with: an operator's removal by hand meanwhile still shows.
        items_stat = _stat(folder / "items") if items_changed else held.items_stat
        scan = change(base)
        labels_stat = held.labels_stat
        if reread_labels:
            labels_stat = _stat(folder / "labels")
            scan = dataclasses.replace(scan, labelled=_labelled(folder / "labels"))
        self._keep(category, _Held(scan, items_stat, labels_stat, held.read_at, ticket))

    def _keep(self, category: str, held: _Held) -> None:
        """Hold ``held`` unless what is held already was read later (a higher ticket)."""
        with self._lock:
            current = self._held.get(category)
            if current is None or held.ticket >= current.ticket:
                self._held[category] = held


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_nlink, st.st_size)


def _names(path: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(path) as it:
        return [d.name for d in it]
    return []


def _labelled(labels_dir: Path) -> frozenset[str]:
    return frozenset(name[:-5] for name in _names(labels_dir) if name.endswith(".json") and parse_id(name[:-5]))


class LabelCache(Generic[_T]):
    """A category's parsed label files. Asked again for the same labelled set (the very
    object a snapshot carries: its labels folder unchanged since, so no label was written or
    replaced) it answers at once; otherwise each file is parsed again only if its ``stat``
    changed. Holds only the labels asked for last (bounded by the store's labelled items)."""

    def __init__(self, read: Callable[[str], _T | None]) -> None:
        self._read = read
        self._held: dict[str, tuple[tuple[int, int, int], _T | None]] = {}
        self._last: tuple[object, list[_T]] | None = None
        self._lock = threading.Lock()

    def read_all(self, labelled: frozenset[str], paths: Callable[[], Iterable[str]]) -> list[_T]:
        """The labels at ``paths()`` that exist and parse, in their order; ``labelled`` is the
        snapshot's set they come from."""
        with self._lock:
            previous, last = self._held, self._last
        if last is not None and last[0] is labelled:
            return list(last[1])
        held: dict[str, tuple[tuple[int, int, int], _T | None]] = {}
        for path in paths():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            hit = previous.get(path)
            held[path] = hit if hit is not None and hit[0] == key else (key, self._read(path))
        found = [value for _, value in held.values() if value is not None]
        with self._lock:
            self._held, self._last = held, (labelled, found)
        return list(found)
