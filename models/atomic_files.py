"""Files replaced whole: a reader (another process, a server watching the store, a run that is
resumed) finds the old file or the new one, never half of one.

The one way the project writes a file in place of another: a temporary file beside it, with a
name no other writer can take (two exports, two replicas or two threads may write the same
path at once), renamed over the target; a failure removes the temporary file. The temporary
file is created with mode 0666 less the umask, as ``open`` would create the target itself
(``tempfile.mkstemp``'s 0600 left store files unreadable to a server of another user).
``durable=True`` also fsyncs the file and its folder, so the rename survives a power cut: for
what an operator decided (a threshold, a label), not for what a rerun rewrites.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Contents = bytes | str | Callable[[BinaryIO], object]


def temp_name(path: Path) -> str:
    """A hidden name in ``path``'s folder that no other writer of ``path`` takes."""
    return f".{path.name}.{secrets.token_hex(6)}.tmp"


def write_atomic(path: str | Path, contents: Contents, *, durable: bool = False,
                 temp: str | None = None) -> None:
    """Replace ``path`` with ``contents``: bytes, text (UTF-8), or a function that writes into
    the open binary file (``torch.save``, a serialized plan). ``temp`` names the temporary
    file where a sweeper must recognise it (default: :func:`temp_name`)."""
    path = Path(path)
    tmp = path.parent / (temp or temp_name(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(contents):
                contents(f)
            else:
                f.write(contents.encode() if isinstance(contents, str) else contents)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make the renames and creations in ``folder`` durable (best effort: some file systems
    refuse to open or sync a folder, and the data itself is already synced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["Contents", "fsync_folder", "temp_name", "write_atomic"]
