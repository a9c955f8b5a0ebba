"""The review store: images the service kept for a person to judge, and that person's labels.

One store, read and written by both halves (its records: :mod:`models.review_records`; reading it,
without the lock: :mod:`models.review_reader`): the service captures items and records labels
(:mod:`service.pipeline.review`, :mod:`service.api.review`); ``msflow recalibrate`` and
``msflow train --include-reviewed-ok`` read them offline, without a server or Redis::

    <root>/                          MSFLOW_REVIEW_STORE (default <model store>/.review)
      .lock                          writers' flock: budget check, prune and write are one step
      <category>/items/<id>/         one kept image: image.<ext>, heatmap.png, item.json
      <category>/items/.tmp-*/       an item being written, renamed into place once complete
      <category>/labels/<id>.json    its label (replaced atomically when an operator relabels)

    <id> = <UTC yyyymmddTHHMMSSffffff>-<verdict>-<bytes, 10 digits>-<image sha256[:12]>

Why files on a shared volume rather than Redis: labels are training data. They must survive
a Redis restart without persistence or a full ``noeviction`` Redis, work on a single host
without Redis, and be readable by the offline tools that have no Redis. Why the id carries the
verdict, the size and the image digest: one ``scandir`` per category (no file read, no
``stat``) gives the budget, the pending counts, the verdict filter and duplicate detection.

Budget, checked before anything is written (:meth:`ReviewStore.add`): at most
``max_items`` items and ``max_bytes`` bytes in the whole store (each item counts its files
plus :data:`LABEL_RESERVE` for the label it may get, so labelling never exceeds the bound), and
at most ``category_share`` of each in one category (refused as ``category_full``).
Expired items go first: unlabelled ones after ``retention_s``, labelled ones after
``label_retention_s`` (export the labels before). A full store refuses new items rather than
evicting an operator's backlog; the caller counts the refusal. Across hosts, ``flock`` on
network file systems is advisory: replicas on different hosts may overshoot by the items
they write at the same instant. What a writer killed mid-write leaves (a staging folder, a
label's temporary file) counts against the budget until swept (:mod:`models.review_leftovers`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from models.atomic_files import fsync_folder, write_atomic
from models.review_index import CategoryScan, Entry, parse_id
from models.review_leftovers import STAGING_PREFIX, label_temp_name, sweep
from models.review_reader import LABEL_RESERVE, ItemNotFound, ReviewError, ReviewReader
from models.review_records import Label, ReviewHeatmap, ReviewImage, ReviewItem, ReviewLabel

REVIEWED_OK = "reviewed_ok.json"  # in a run and its exported versions: the reviewed OK images it trained on
# Every format the server accepts (models.image_acceptance.ACCEPTED_FORMATS). MPO is a JPEG with
# more pictures after the first (cameras, phones): without it one was kept as image.bin, served
# as application/octet-stream and exported under a name `msflow train --data` does not read.
IMAGE_TYPES = {"PNG": ("png", "image/png"), "JPEG": ("jpg", "image/jpeg"), "MPO": ("jpg", "image/jpeg"),
               "BMP": ("bmp", "image/bmp"), "TIFF": ("tif", "image/tiff"), "WEBP": ("webp", "image/webp")}


@dataclass(frozen=True)
class Budget:
    max_bytes: int
    max_items: int
    retention_s: float
    label_retention_s: float
    # The most of max_items and max_bytes one category may hold: a line in a defect wave filled
    # the whole store, and every other category's captures were refused until it was labelled.
    category_share: float = 1.0


def resolve_root(path: str | Path) -> Path:
    """A review store given as itself or as the model store that holds it (``<store>/.review``)."""
    p = Path(path)
    return p / ".review" if (p / ".review").is_dir() else p


def id_stamp(moment: datetime) -> str:
    """The time part of an item id (UTC, microseconds)."""
    return moment.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%f")


def _stamp_after(now: datetime, newest_id: str | None) -> str:
    """The time part of a new item's id: ``now``'s, or 1 µs past the category's newest id's.
    Ids order the pending items a reviewer pages through by the ``after`` cursor, so an item
    written after a page was read must sort after it; ``now`` was taken before the store's
    lock (a writer that stamped later may have written first) and clocks step back."""
    stamp = id_stamp(now)
    if newest_id is None or stamp > newest_id[:len(stamp)]:
        return stamp
    newest = datetime.strptime(newest_id[:len(stamp)], "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)
    return id_stamp(newest + timedelta(microseconds=1))


def image_digest(image: bytes) -> str:
    """An image's sha256, hex: its item id holds the first 12 digits (duplicates are refused by them)."""
    return hashlib.sha256(image).hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ReviewStore(ReviewReader):
    """The store at ``root``, read and, under ``budget``, written (the offline tools open it
    without one, to read); every method is blocking (the service calls them in a thread)."""

    def __init__(self, root: str | Path, budget: Budget | None = None) -> None:
        super().__init__(root)
        self.budget = budget

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ budget, retention
    def usage(self, after_expiry_at: float | None = None) -> tuple[int, int]:
        """(items, bytes) the budget counts, over every category; with ``after_expiry_at``
        (epoch seconds), what would be left once they expired. Staging folders count (a dead writer's until swept)."""
        items = used = 0
        for category in self.categories():
            n, size = self._category_usage(category, after_expiry_at)
            items, used = items + n, used + size
        return items, used

    def _category_usage(self, category: str, after_expiry_at: float | None = None) -> tuple[int, int]:
        scan = self.scan(category)
        expired = [] if after_expiry_at is None else self._expired(scan, after_expiry_at)
        return len(scan.entries) - len(expired), scan.bytes + scan.staging - sum(e.bytes for e in expired)

    def prune(self, now: float | None = None) -> int:
        """Remove expired items, then what dead writers left and orphan labels
        (:func:`models.review_leftovers.sweep`); returns the items removed."""
        if self.budget is None:
            return 0
        now = time.time() if now is None else now
        with self._locked():
            removed = self._expire(now)
            for category in self.categories():
                scan = self.scan(category)
                sweep(self.root / category, scan.labelled - {e.id for e in scan.entries}, now)
        return removed

    def _expire(self, now: float) -> int:
        """Remove the items past their retention (holding the lock)."""
        removed = 0
        for category in self.categories():
            scan = self.scan(category)
            gone = self._expired(scan, now)
            for e in gone:
                shutil.rmtree(self.root / category / "items" / e.id, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    (self.root / category / "labels" / f"{e.id}.json").unlink()
            self._index.removed(category, {e.id for e in gone}, scan)
            removed += len(gone)
        return removed

    def _expired(self, scan: CategoryScan, now: float) -> list[Entry]:
        """The entries past their retention. Entries are oldest first, so only the expired
        ones and one more are looked at: an add pays for what it frees, not for the store."""
        assert self.budget is not None
        shortest = min(self.budget.retention_s, self.budget.label_retention_s)
        out = []
        for e in scan.entries:
            if now - e.captured <= shortest:
                break
            keep = self.budget.label_retention_s if e.id in scan.labelled else self.budget.retention_s
            if now - e.captured > keep:
                out.append(e)
        return out

    # ------------------------------------------------------------------ writing
    def refusal(self, category: str, image: bytes,
                digest: str | None = None) -> Literal["full", "category_full", "duplicate"] | None:
        """What :meth:`add` would answer for ``image`` as the store stands, where that is a
        refusal, without the lock or any write: a caller checks before it renders what the
        item would hold (a heatmap) for a store that cannot take it. :meth:`add` decides.
        ``digest``: the image's :func:`image_digest`, where the caller has it (then passed to
        :meth:`add` too, so that a capture hashes its image once)."""
        if self.budget is None:
            return None
        if (digest or image_digest(image))[:12] in self.scan(category).digests:
            return "duplicate"
        now = time.time()  # as add() sees it, once it expired what is due
        return self._room(self.usage(now), self._category_usage(category, now), len(image) + LABEL_RESERVE)

    def _room(self, store: tuple[int, int], category: tuple[int, int],
              cost: int) -> Literal["full", "category_full"] | None:
        """Why one more item of ``cost`` bytes does not fit beside what the store and its
        category hold (items, bytes), or None when it does."""
        assert self.budget is not None
        b = self.budget
        if store[0] + 1 > b.max_items or store[1] + cost > b.max_bytes:
            return "full"
        if category[0] + 1 > b.max_items * b.category_share or category[1] + cost > b.max_bytes * b.category_share:
            return "category_full"
        return None

    def add(self, category: str, fields: dict[str, Any], image: bytes, image_format: str,
            size: tuple[int, int], heatmap: bytes | None, heatmap_size: tuple[int, int] | None,
            now: datetime | None = None, digest: str | None = None,
            ) -> tuple[Literal["stored", "full", "category_full", "duplicate"], str | None]:
        """Keep one image with its answer (``fields``: the :class:`ReviewItem` fields the
        caller knows). Returns ("stored", id), ("duplicate", None) when the category already
        holds these image bytes, or ("full" or "category_full", None) when the budget has no
        room in the store or in the category's share of it. ``digest``: the
        image's :func:`image_digest`, where the caller has it."""
        if self.budget is None:
            raise ReviewError("this review store was opened without a budget: it cannot take items")
        base = self._category_dir(category)
        now = now or datetime.now(timezone.utc)
        digest = digest or image_digest(image)
        ext, media_type = IMAGE_TYPES.get(image_format.upper(), ("bin", "application/octet-stream"))
        verdict = fields["verdict"]
        with self._locked():
            self._expire(now.timestamp())
            before = self.scan(category)  # what this write's snapshot is built on (models.review_index)
            if digest[:12] in before.digests:
                return "duplicate", None
            items, used = self.usage()
            stamp = _stamp_after(now, before.entries[-1].id if before.entries else None)
            draft = self._item(category, fields, "0" * 10, digest, ext, media_type, image, image_format, size,
                               heatmap_size, now, verdict, stamp)
            cost = len(image) + len(heatmap or b"") + len(draft.model_dump_json()) + LABEL_RESERVE
            if (refused := self._room((items, used), (len(before.entries), before.bytes + before.staging),
                                      cost)) is not None:
                return refused, None
            record = self._item(category, fields, f"{cost:010d}", digest, ext, media_type, image, image_format,
                                size, heatmap_size, now, verdict, stamp)
            items_dir = base / "items"
            items_dir.mkdir(parents=True, exist_ok=True)
            staging = items_dir / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
            staging.mkdir()
            try:
                _fsync_write(staging / record.image.file, image)
                if heatmap is not None:
                    _fsync_write(staging / "heatmap.png", heatmap)
                _fsync_write(staging / "item.json", record.model_dump_json().encode())  # last: complete
                staging.rename(items_dir / record.id)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_folder(items_dir)
            entry = parse_id(record.id)
            assert entry is not None
            self._index.added(category, entry, before)
            return "stored", record.id

    @staticmethod
    def _item(category: str, fields: dict[str, Any], size_field: str, digest: str, ext: str, media_type: str,
              image: bytes, image_format: str, size: tuple[int, int], heatmap_size: tuple[int, int] | None,
              now: datetime, verdict: str, stamp: str) -> ReviewItem:
        item_id = f"{stamp}-{verdict}-{size_field}-{digest[:12]}"
        return ReviewItem(
            **fields, id=item_id, category=category, captured_at=now,
            image=ReviewImage(file=f"image.{ext}", format=image_format.upper(), media_type=media_type,
                              width=size[0], height=size[1], bytes=len(image), sha256=digest),
            heatmap=ReviewHeatmap(width=heatmap_size[0], height=heatmap_size[1]) if heatmap_size else None)

    def label(self, category: str, item_id: str, label: Label, by: str, defect_type: str | None = None,
              note: str | None = None) -> tuple[ReviewLabel, ReviewLabel | None]:
        """Record (or replace) the label of an item; returns it and the label it replaced.

        Under the store's lock, as retention removes items under it (another process's sweep
        too): an item is either gone before (404) or kept with its label. Without it, a label
        written while a sweep removed its item found the folder not yet gone, was answered, and
        was deleted with the item."""
        with self._locked():
            return self._label(category, item_id, label, by, defect_type, note)

    def _label(self, category: str, item_id: str, label: Label, by: str, defect_type: str | None,
               note: str | None) -> tuple[ReviewLabel, ReviewLabel | None]:
        item = self.item(category, item_id)
        # Its image gone, item.json left (a prune killed mid-rmtree, a hand on the volume): nobody
        # saw what they judged, and recalibrate and train leave such a label out; it was answered
        # 200 and counted in the stats all the same.
        self.image_path(item)  # gone or damaged (cut short): ItemNotFound, as to the image route
        record = ReviewLabel(id=item_id, category=category, label=label,
                             defect_type=defect_type if label == "ng" else None, note=note or None, by=by,
                             at=datetime.now(timezone.utc), model_version=item.model_version,
                             model_verdict=item.verdict, model_is_anomalous=item.is_anomalous,
                             raw_score=item.raw_score, image_sha256=item.image.sha256)
        data = record.model_dump_json().encode()
        if len(data) > LABEL_RESERVE:
            raise ReviewError(f"the label is {len(data)} bytes; at most {LABEL_RESERVE} (shorten the note)")
        previous = self.get_label(category, item_id)
        before = self.scan(category)  # what the index's snapshot of this write is built on
        path = self._label_path(category, item_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(path, data, durable=True, temp=label_temp_name(item_id, secrets.token_hex(4)))
            if not self._item_dir(category, item_id).is_dir():  # removed by hand meanwhile: take the label back
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                raise ItemNotFound(f"review item {item_id} expired")
        finally:
            # Told, not left to the labels folder's stat: where timestamps are coarse it came
            # out unchanged, and the item stayed pending (and a relabel uncounted) for 10 s.
            self._index.labels_written(category, before)
        return record, previous
