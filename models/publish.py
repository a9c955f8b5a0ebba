"""Putting a new version into the model store: the one step where two writers can meet.

An export or a recalibration builds its version in a dot folder of the category (which
:func:`~models.manifest.list_versions`, and so the watching server, never sees), then
:func:`publish_version` chooses the number, writes what names it and renames the folder into
place, under an exclusive lock on the category. Without the lock two exports at once took
the same number, and the second failed at its rename after all its work.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from models.manifest import VERSION_PATTERN, is_numeric_version, list_versions

LOCK_FILE = ".lock"  # a dot name: never taken for a version


@contextlib.contextmanager
def category_lock(category_dir: Path) -> Iterator[None]:
    """Exclusive among the store's writers on this host and on a shared volume whose file
    system honours flock (local, NFSv4); released when the file closes, a crash included."""
    with open(category_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def next_version(category_dir: Path) -> str:
    return str(max((int(v) for v in list_versions(category_dir) if is_numeric_version(v)), default=0) + 1)


def check_version_name(version: str) -> str:
    if not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"version {version!r} must match {VERSION_PATTERN.pattern}")
    return version


def publish_version(category_dir: Path, staging: Path, version: str | None,
                    name_it: Callable[[str], None]) -> Path:
    """Rename ``staging`` to ``category_dir/<version>`` (the next number when ``version`` is
    None) and return it. ``name_it(version)`` writes, into ``staging``, what carries the
    number (the manifest, a report) once it is chosen. The folder is made readable by all:
    ``mkdtemp`` makes it 0700, and a server running as another user (a trainer job writing
    the store as root, say) could not read it."""
    with category_lock(category_dir):
        chosen = check_version_name(version) if version is not None else next_version(category_dir)
        final = category_dir / chosen
        if final.exists():
            raise FileExistsError(f"{final} already exists")
        name_it(chosen)
        os.chmod(staging, 0o755)
        staging.rename(final)
    return final
