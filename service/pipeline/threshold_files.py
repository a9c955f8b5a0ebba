"""An override's durable copy on disk (:mod:`service.pipeline.thresholds`): how it is written,
read back, recognised as changed, and whether this process can write it at all.

``<dir>/<category>/<version>/threshold_override.json`` is replaced atomically (temporary
file, fsync, rename), so a reader sees the old or the new override, never half of one; and
as a rename gives the file a new inode, its ``stat`` (inode, mtime, size) tells a process
that another one changed it without reading it (:func:`file_stat`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from service.schemas import ThresholdOverride

log = logging.getLogger(__name__)

OVERRIDE_FILE = "threshold_override.json"
CALIBRATED_MARKER = "calibrated"  # Redis value field of an explicit "no override"

# An override is a few hundred bytes; a file or a Redis key holding more was not written by
# this server (another writer's, or garbage), and is never read past this.
MAX_STORED_BYTES = 4096
FileStat = tuple[int, int, int] | None  # an override file's (inode, mtime ns, size); None: no file
UNREADABLE: FileStat = (-1, -1, -1)  # a stat that failed for another reason than "no file"


def file_stat(path: Path) -> FileStat:
    """What tells a changed override file from the one read before, without reading it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # unreadable for a moment: read_override says why when it is read
        log.debug("cannot stat %s: %s", path, exc)
        return UNREADABLE
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def folder_writable(folder: Path) -> bool:
    """Whether this process may write in ``folder``, or in the nearest folder above it that
    exists when it does not yet (False on a read-only mount, even for root)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def read_override(path: Path, version: str) -> ThresholdOverride | None:
    """The override in ``path`` for ``version``; None without a file or with an unusable one."""
    try:
        with path.open("rb") as f:
            text = f.read(MAX_STORED_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    return parse_override(text, version, str(path))


def parse_override(value: str | bytes | None, version: str, where: str) -> ThresholdOverride | None:
    """An override as a file or Redis holds it; None for the "calibrated" marker or anything unusable."""
    return parse_stored(value, version, where)[1]


def parse_stored(value: str | bytes | None, version: str, where: str) -> tuple[bool, ThresholdOverride | None]:
    """(usable, override): usable is False for a value that is neither an override of
    ``version`` nor the "calibrated" marker (garbage, another version's), which says nothing
    about the threshold: Redis's sync must not read it as a DELETE."""
    if value is None:
        return True, None
    if len(value) > MAX_STORED_BYTES:
        log.warning("ignoring %s: it holds more than the %d bytes of any threshold override", where,
                    MAX_STORED_BYTES)
        return False, None
    try:
        data = json.loads(value)
        if isinstance(data, dict) and data.get(CALIBRATED_MARKER) is True:
            return True, None  # an explicit DELETE
        override = ThresholdOverride.model_validate(data)
    except (ValueError, ValidationError) as exc:
        log.warning("ignoring the invalid threshold override in %s: %s", where, exc)
        return False, None
    if override.version != version:  # a version folder copied under another name
        log.warning("ignoring the threshold override in %s: it was set for version %s", where, override.version)
        return False, None
    return True, override
