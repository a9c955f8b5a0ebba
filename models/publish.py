"""Putting a new version into the model store: the one step where two writers can meet.

An export or a recalibration builds its version in a dot folder of the category (which
:func:`~models.manifest.list_versions`, and so the watching server, never sees), then
:func:`publish_version` chooses the number, writes what names it and renames the folder into
place, under an exclusive lock on the category. Without the lock two exports at once took
the same number, and the second failed at its rename after all its work.

A writer killed before it publishes (SIGTERM from ``timeout`` or a job's deadline, the OOM
killer during the ONNX export, a power cut) leaves its dot folder behind, model and all. A
folder made by :func:`new_staging` is held (``flock`` on its :data:`STAGING_LOCK`) for its
writer's life, so :func:`publish_version` removes those no live writer holds. A dot folder
without that file (another writer's, or one made a moment ago) is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from models.manifest import VERSION_PATTERN, is_numeric_version, list_versions

LOCK_FILE = ".lock"  # a dot name: never taken for a version
STAGING_LOCK = ".staging.lock"  # in a staging folder: held by its writer until it publishes

log = logging.getLogger(__name__)


@contextlib.contextmanager
def category_lock(category_dir: Path) -> Iterator[None]:
    """Exclusive among the store's writers on this host and on a shared volume whose file
    system honours flock (local, NFSv4); released when the file closes, a crash included."""
    with open(category_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class StagingFolder:
    """A dot folder of the category to build a version in, held until :meth:`close` (or the
    writer's death), so :func:`remove_abandoned_staging` tells it from one whose writer died."""

    def __init__(self, category_dir: Path, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=category_dir))
        # Locked under another name, then renamed: a sweep that found STAGING_LOCK created but
        # not yet locked would take the folder for abandoned.
        pending = self.path / f"{STAGING_LOCK}.new"
        self._fd: int | None = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        pending.rename(self.path / STAGING_LOCK)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def new_staging(category_dir: Path, prefix: str) -> StagingFolder:
    return StagingFolder(category_dir, prefix)


def remove_abandoned_staging(category_dir: Path) -> list[str]:
    """Remove the staging folders of ``category_dir`` whose writer is gone (their
    :data:`STAGING_LOCK` held by no process); their names. Called under the category lock."""
    removed = []
    for folder in category_dir.iterdir():
        if not folder.name.startswith(".") or folder.name == LOCK_FILE:
            continue
        try:
            fd = os.open(folder / STAGING_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # no such file (not a held staging folder), or not a folder
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        finally:
            os.close(fd)
    if removed:
        log.warning("model store %s: removed %d folder(s) left by exports that died before publishing: %s",
                    category_dir, len(removed), ", ".join(removed))
    return removed


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
        remove_abandoned_staging(category_dir)  # the writer holds ``staging``: never its own
        chosen = check_version_name(version) if version is not None else next_version(category_dir)
        final = category_dir / chosen
        if final.exists():
            raise FileExistsError(f"{final} already exists")
        (staging / STAGING_LOCK).unlink(missing_ok=True)  # its writer's hold stays on the open file
        name_it(chosen)
        os.chmod(staging, 0o755)
        staging.rename(final)
    return final
