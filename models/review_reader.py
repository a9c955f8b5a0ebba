"""Reading a review store (:mod:`models.review_store`): its layout, and the items and labels
it holds, for the API (an item, its files, the pending page, the labels) and the offline
tools (``msflow recalibrate``, ``msflow train --include-reviewed-ok``, the label export).

Reads take no lock: an item appears by a rename once complete and a label file is replaced
atomically, so a reader sees each whole or not at all; an item retention removes meanwhile
reads as :class:`ItemNotFound` (a 404) or is left out of a listing. What writes the store
(budget, retention, captures, labels) is :class:`models.review_store.ReviewStore`, a
:class:`ReviewReader` too.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from models.manifest import CATEGORY_PATTERN
from models.review_index import CategoryScan, LabelCache, StoreIndex, parse_id
from models.review_records import ReviewItem, ReviewLabel

LABEL_RESERVE = 4096  # bytes each item reserves for its label file (a label is refused above it)
ITEM_JSON_LIMIT = 256 * 1024  # an item.json larger than this is not ours
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}\Z")  # a file item.json names: image.png, heatmap.png


class ReviewError(ValueError):
    """A review item or label that does not exist or cannot be written."""


class ItemNotFound(ReviewError):
    """No such item (never captured, expired, or a malformed id)."""


def _read_label(path: str | Path) -> ReviewLabel | None:
    try:
        with open(path, "rb") as f:
            data = f.read(LABEL_RESERVE + 1)
    except FileNotFoundError:
        return None
    try:
        label = ReviewLabel.model_validate_json(data)
    except ValidationError:
        return None
    # The file's own name and category folder, not what it says (a shared volume: a label copied
    # under another item's name counted that item twice, in the stats, the export and the refit).
    path = Path(path)
    return label if (label.id, label.category) == (path.name[:-len(".json")], path.parent.parent.name) else None


class ReviewReader:
    """The store at ``root``, read; every method is blocking (the service calls them in a thread)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._index = StoreIndex(self.root)
        self._labels: dict[str, LabelCache[ReviewLabel]] = {}

    # ------------------------------------------------------------------ layout
    def _category_dir(self, category: str) -> Path:
        if not CATEGORY_PATTERN.fullmatch(category):
            raise ItemNotFound(f"no category {category!r}")
        return self.root / category

    def _item_dir(self, category: str, item_id: str) -> Path:
        if parse_id(item_id) is None:
            raise ItemNotFound(f"no review item {item_id!r}")
        return self._category_dir(category) / "items" / item_id

    def _label_path(self, category: str, item_id: str) -> Path:
        if parse_id(item_id) is None:
            raise ItemNotFound(f"no review item {item_id!r}")
        return self._category_dir(category) / "labels" / f"{item_id}.json"

    def categories(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and CATEGORY_PATTERN.fullmatch(p.name))

    def scan(self, category: str) -> CategoryScan:
        """The category's items and labelled ids, from their names (:mod:`models.review_index`
        keeps them between calls while the directories are unchanged)."""
        self._category_dir(category)  # a name that is no category is refused, not looked up
        return self._index.scan(category)

    # ------------------------------------------------------------------ reading
    def item(self, category: str, item_id: str) -> ReviewItem:
        path = self._item_dir(category, item_id) / "item.json"
        try:
            with open(path, "rb") as f:
                data = f.read(ITEM_JSON_LIMIT + 1)
        except (FileNotFoundError, NotADirectoryError):
            # A well-formed id: an item this store kept once, or one it never had (another
            # server's store, a typo'd timestamp); the files cannot tell which.
            raise ItemNotFound(f"no review item {item_id!r} in {category}: removed by retention (or by hand), "
                               "or never captured in this store") from None
        try:
            if len(data) > ITEM_JSON_LIMIT:
                raise ValueError("too large")
            item = ReviewItem.model_validate_json(data)
        except (ValueError, ValidationError) as exc:
            raise ItemNotFound(f"review item {item_id!r} is unreadable") from exc
        if item.id != item_id or item.category != category:
            raise ItemNotFound(f"review item {item_id!r} is misplaced")
        return item

    def _kept_file(self, category: str, item_id: str, name: str) -> Path:
        """The path of a file ``item.json`` names, refused (:class:`ItemNotFound`) unless it is a
        file of the item's own folder: item.json is read from a shared volume, and a name like
        ``../../../etc/passwd`` in it, or a symlink in the folder, made the image route serve any
        file the server could read (reproduced). The store's root may itself be a symlink."""
        folder = self._item_dir(category, item_id)
        path = folder / name
        if (not _PLAIN_NAME.match(name) or path.is_symlink()
                or os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder)
                or not os.path.realpath(folder).startswith(os.path.realpath(self.root) + os.sep)):
            raise ItemNotFound(f"review item {item_id!r} names a file outside its folder")
        return path

    def file(self, category: str, item_id: str, which: Literal["image", "heatmap"]) -> tuple[Path, str]:
        """(path, media type) of an item's image or heatmap; :class:`ItemNotFound` (a 404) also
        when the file is gone but item.json is not (a prune killed mid-``rmtree``, an expiry racing the read)."""
        item = self.item(category, item_id)
        if which == "image":
            return self.image_path(item), item.image.media_type
        if item.heatmap is None:
            raise ItemNotFound(f"review item {item_id} has no heatmap")
        path = self._kept_file(category, item_id, item.heatmap.file)
        if not path.is_file():
            raise ItemNotFound(f"review item {item_id} has no heatmap file (expired or removed)")
        return path, "image/png"

    def image_path(self, item: ReviewItem) -> Path:
        """The path of ``item``'s image, :class:`ItemNotFound` where it is gone or not the size
        item.json records (a copy cut short, a damaged volume): a reviewer was served half a
        picture and labelled it, the export zipped it, and recalibrate stopped at it."""
        path = self._kept_file(item.category, item.id, item.image.file)
        try:
            size = path.stat().st_size if path.is_file() else None
        except FileNotFoundError:
            size = None
        if size is None:
            raise ItemNotFound(f"review item {item.id} has no image file (expired or removed)")
        if size != item.image.bytes:
            raise ItemNotFound(f"review item {item.id}'s image file is damaged: {size} bytes, "
                               f"{item.image.bytes} when it was kept")
        return path

    def get_label(self, category: str, item_id: str) -> ReviewLabel | None:
        return _read_label(self._label_path(category, item_id))

    def pending(self, category: str, verdict: str | None = None, after: str | None = None,
                limit: int = 50) -> tuple[list[ReviewItem], str | None]:
        """Unlabelled items, oldest first, from after the id ``after``; and the next page's cursor."""
        entries = [e for e in self.scan(category).pending
                   if (verdict is None or e.verdict == verdict) and (after is None or e.id > after)]
        page: list[ReviewItem] = []
        read = 0
        for e in entries:
            if len(page) == limit:
                break
            read += 1
            with contextlib.suppress(ItemNotFound):  # expired between the scan and the read
                page.append(self.item(category, e.id))
        return page, entries[read - 1].id if read < len(entries) and read else None

    def labels(self, category: str) -> list[ReviewLabel]:
        """The labels of the category's items, oldest item first (each file parsed again only
        when it changed)."""
        scan = self.scan(category)
        folder = str(self._category_dir(category) / "labels")
        cache = self._labels.get(category) or self._labels.setdefault(category, LabelCache(_read_label))
        return cache.read_all(scan.labelled, lambda: (os.path.join(folder, f"{i}.json") for i in
                                                      sorted(scan.labelled & {e.id for e in scan.entries})))

    def labelled(self, category: str) -> list[tuple[ReviewItem, ReviewLabel, Path]]:
        """Every labelled item with its label and image path, oldest first; one whose image is
        gone or damaged (:meth:`image_path`) is missing, as to the API (recalibrate stopped at
        it: "image file not found", "cannot be decoded (image file is truncated)")."""
        out = []
        for label in self.labels(category):
            with contextlib.suppress(ItemNotFound):
                item = self.item(category, label.id)
                out.append((item, label, self.image_path(item)))
        return out

    def reviewed_ok_images(self, category: str) -> list[tuple[ReviewItem, Path]]:
        """Operator-confirmed OK items and their image paths, one per distinct image."""
        seen: set[str] = set()
        out = []
        for item, label, path in self.labelled(category):
            if label.label == "ok" and item.image.sha256 not in seen:
                seen.add(item.image.sha256)
                out.append((item, path))
        return out
