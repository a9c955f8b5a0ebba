"""What writes that never finished leave in a review store, how its budget counts them, and
when they are swept (:meth:`models.review_store.ReviewStore.prune`).

A writer killed mid-item (OOM, SIGKILL, a lost host) leaves its staging folder
``<category>/items/.tmp-*`` with whatever it had written (an image of many MB); one killed
mid-label leaves ``<category>/labels/.<id>.<hex>.tmp``. Neither is an item or a label (no
scan lists them), yet both hold disk: the budget counts a staging folder's bytes until it
is swept (:func:`staging_bytes`), so a crash cannot push the store past
``MSFLOW_REVIEW_MAX_BYTES``, and the sweep removes both once older than :data:`STALE_S`
(no live write takes that long, so a live one is never swept).

A label whose item is gone (expired, removed by hand) is an orphan and is swept too, but
only once its item folder is really absent (a snapshot may be stale: another replica's new
item is not in it yet) and the label is older than :data:`ORPHAN_GRACE_S`: a label is
written after its item, so a young label without a listed item is far more likely a
listing that lags than an orphan, and deleting it loses an operator's judgement.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

STAGING_PREFIX = ".tmp-"  # <category>/items/.tmp-<hex>: an item being written, renamed into place when complete
LABEL_TEMP_SUFFIX = ".tmp"  # <category>/labels/.<id>.<hex>.tmp: a label being written, replaced onto <id>.json
STALE_S = 3600.0  # a staging folder or label temporary file older than this was left by a dead writer
ORPHAN_GRACE_S = 600.0  # a label without its item is kept this long (MAX_AGE_S of a snapshot, many times over)


def label_temp_name(item_id: str, token: str) -> str:
    """The temporary file a label is written to before it replaces ``<id>.json``."""
    return f".{item_id}.{token}{LABEL_TEMP_SUFFIX}"


def staging_bytes(items_dir: Path, names: Iterable[str]) -> int:
    """The bytes of the staging folders among ``names`` (the listing of ``items_dir``): a
    writer at work now, or one that died and left them until :func:`sweep`."""
    total = 0
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(items_dir / name) as it:
            for f in it:
                with contextlib.suppress(FileNotFoundError):  # renamed into place or swept meanwhile
                    total += f.stat(follow_symlinks=False).st_size
    return total


def sweep(category_dir: Path, orphans: Iterable[str], now: float) -> None:
    """Remove, in one category: orphan labels (``orphans``: labelled ids the listing has no
    item for) whose item folder is absent and that are older than :data:`ORPHAN_GRACE_S`,
    and staging folders and label temporary files older than :data:`STALE_S`. ``now``:
    epoch seconds. Call holding the store's lock (no writer of this store is mid-item)."""
    items_dir, labels_dir = category_dir / "items", category_dir / "labels"
    for item_id in orphans:
        if (items_dir / item_id).exists():
            continue  # the listing lagged (another process added it): not an orphan
        label = labels_dir / f"{item_id}.json"
        with contextlib.suppress(FileNotFoundError):
            if now - label.stat().st_mtime > ORPHAN_GRACE_S:
                label.unlink()
    _remove_stale(items_dir, lambda name: name.startswith(STAGING_PREFIX), now)
    _remove_stale(labels_dir, lambda name: name.startswith(".") and name.endswith(LABEL_TEMP_SUFFIX), now)


def _remove_stale(folder: Path, match: Callable[[str], bool], now: float) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as it:
        for d in it:
            if not match(d.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - d.stat(follow_symlinks=False).st_mtime <= STALE_S:
                    continue
                if d.is_dir(follow_symlinks=False):
                    shutil.rmtree(d.path, ignore_errors=True)
                else:
                    os.unlink(d.path)
