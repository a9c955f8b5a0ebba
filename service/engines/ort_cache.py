"""A byte budget for ONNX Runtime's TensorRT engine cache (``MSFLOW_ORT_TENSORRT_CACHE_MAX_BYTES``).

The cache (:mod:`service.engines.onnxruntime`) is ``root/<model sha256>/``, one folder of
engines per model, and TensorRT's timing cache in ``root`` itself. Every exported or
recalibrated version is a new sha256 and a new engine (tens to hundreds of MB), and nothing
else removes the old ones: on Kubernetes the root is on /tmp, an emptyDir whose ``sizeLimit``
the kubelet enforces by evicting the pod. So before a model's engine is built the cache is
pruned to the budget, least recently used model first, and a model the budget cannot hold is
served without a cache rather than spend past it.

Each model folder carries two files:

- ``.in-use.lock``: every process that loads or serves the model holds a shared ``flock`` on
  it for the engine's life (:func:`hold_model_folder`). The pruner removes a folder only under
  an exclusive non-blocking ``flock`` of it, so a model in use by any process is never removed.
- ``.last-used``: touched whenever a process takes the model's cache; the order of pruning.

While a process builds an engine, ``.reserved`` in its folder holds the bytes the build is
expected to write, counted until the engine is written, so engines built at once for several
models (the categories an engine process loads together) share the budget instead of each
seeing it free. Reservations are made one at a time under ``root/.budget.lock``.

Only folders named like a sha256 are ever removed: the timing cache and anything else in the
root stay, and count.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 512 * MiB  # half the k8s manifests' 1 GiB /tmp emptyDir: room for the rest of /tmp
MODEL_FOLDER = re.compile(r"^[0-9a-f]{64}$")
IN_USE_LOCK = ".in-use.lock"
LAST_USED = ".last-used"
RESERVED = ".reserved"
BUDGET_LOCK = ".budget.lock"
_HOLD_TRIES = 10  # a folder removed under a holder's feet is made again; that many times is a bug


def disk_bytes(path: Path) -> int:
    """Bytes ``path`` (a file or a tree, links not followed) takes on disk, as ``du`` and the
    kubelet count them; 0 for what is not there. Entries removed while it walks are skipped."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    total = st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return total
    return total + sum(disk_bytes(Path(entry.path)) for entry in entries)


def _reserved_bytes(folder: Path) -> int:
    try:
        return max(0, int((folder / RESERVED).read_text().strip() or 0))
    except (FileNotFoundError, ValueError):
        return 0


@dataclass(frozen=True)
class ModelFolder:
    """One model's folder in the cache: its bytes (the larger of what it holds and what a build
    in it has reserved) and when it was last used (``.last-used``, else the folder's mtime)."""

    path: Path
    bytes: int
    last_used: float


def model_folders(root: Path) -> list[ModelFolder]:
    """The cache's model folders, least recently used first. Folders that vanish while being
    read are left out."""
    folders = []
    for entry in os.scandir(root):
        if not MODEL_FOLDER.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        try:
            last_used = (folder / LAST_USED).stat().st_mtime
        except FileNotFoundError:
            try:
                last_used = folder.stat().st_mtime
            except FileNotFoundError:
                continue
        folders.append(ModelFolder(folder, max(disk_bytes(folder), _reserved_bytes(folder)), last_used))
    return sorted(folders, key=lambda f: (f.last_used, f.path.name))


def cache_bytes(root: Path) -> int:
    """What the cache counts against its budget: everything on disk, reservations included."""
    folders = model_folders(root)
    loose = disk_bytes(root) - sum(disk_bytes(f.path) for f in folders)
    return max(0, loose) + sum(f.bytes for f in folders)


def remove_if_unused(folder: Path) -> int | None:
    """Remove ``folder`` unless a process holds it; the bytes it took (0: it was already gone),
    or None when it is in use and was kept."""
    try:
        fd = os.open(folder / IN_USE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return 0  # removed meanwhile (another process pruning)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        size = max(disk_bytes(folder), _reserved_bytes(folder))
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("TensorRT engine cache: could not remove all of %s (%s)", folder, e)
        return max(0, size - disk_bytes(folder))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PruneOutcome:
    removed: tuple[str, ...]  # model folders removed, least recently used first
    in_use: tuple[str, ...]  # folders that were next in line but held by a process, kept
    total_bytes: int  # the cache's bytes afterwards
    fits: bool  # total_bytes + the headroom asked for is within the budget


def prune(root: Path, max_bytes: int, headroom: int, keep: Collection[str] = ()) -> PruneOutcome:
    """Remove least recently used model folders of ``root`` that no process holds (and none
    named in ``keep``) until the cache takes at most ``max_bytes - headroom``. Never removes
    anything else (the timing cache)."""
    target = max_bytes - headroom
    removed: list[str] = []
    in_use: list[str] = []
    total = cache_bytes(root)
    if total > target:
        for folder in model_folders(root):
            if total <= target:
                break
            if folder.path.name in keep:
                continue
            freed = remove_if_unused(folder.path)
            if freed is None:
                in_use.append(folder.path.name)
            else:
                removed.append(folder.path.name)
                total -= freed
        total = cache_bytes(root)  # what others wrote or removed meanwhile counts too
    return PruneOutcome(tuple(removed), tuple(in_use), total, total + headroom <= max_bytes)


class CacheHold:
    """A process's shared hold on one model's folder (``.in-use.lock``), for its engine's life:
    while it is open no pruner removes the folder. Closed by :meth:`close` or with the object."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd
        self._reserved = False

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` for this folder until :meth:`release_reservation` (a build)."""
        (self.folder / RESERVED).write_text(str(max(0, nbytes)))
        self._reserved = True

    def release_reservation(self) -> None:
        """Drop this hold's reservation (only while held: once let go, the folder and its
        ``.reserved`` may be another process's)."""
        if self._reserved and self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / RESERVED).unlink()
        self._reserved = False

    def close(self) -> None:
        self.release_reservation()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


def hold_model_folder(root: Path, model_sha256: str) -> CacheHold:
    """Make ``root/<model_sha256>`` (0700) if need be, hold it shared and mark it used now.

    A pruner may remove the folder between its making and the lock: the hold is taken only on
    the lock file that is still the folder's own, else the folder is made again."""
    folder = root / model_sha256
    for _ in range(_HOLD_TRIES):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        try:
            fd = os.open(folder / IN_USE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a pruner removes this very folder
        try:
            still_ours = os.stat(folder / IN_USE_LOCK, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            still_ours = False
        if still_ours:
            (folder / LAST_USED).touch()
            os.utime(folder / LAST_USED)
            return CacheHold(folder, fd)
        os.close(fd)
    raise OSError(f"{folder} was removed {_HOLD_TRIES} times while being held")


@contextlib.contextmanager
def _budget_lock(root: Path) -> Iterator[None]:
    fd = os.open(root / BUDGET_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def reserve_engine_cache(root: Path, model_sha256: str, max_bytes: int, onnx_bytes: int) -> CacheHold | None:
    """Hold the model's folder and make room in the budget for the engine it may build; the
    hold (with the reservation made: release it once the engine is written), or None when the
    budget cannot hold the engine even with every unused folder removed (then the caller must
    not cache: nothing of the model is left held).

    The engine is expected to take as much as the largest model folder already cached (the
    same graph, exported again) and at least the ONNX file (FP16 weights plus TensorRT's
    kernels); what the model's own folder already holds is not counted twice."""
    with _budget_lock(root):
        hold = hold_model_folder(root, model_sha256)
        folders = model_folders(root)
        own = next((f.bytes for f in folders if f.path.name == model_sha256), 0)
        expected = max([onnx_bytes, *(f.bytes for f in folders)])
        outcome = prune(root, max_bytes, headroom=max(0, expected - own), keep={model_sha256})
        if outcome.removed:
            log.info("TensorRT engine cache %s: removed %d least recently used model folder(s) (%s) to keep it "
                     "within %d bytes", root, len(outcome.removed), ", ".join(n[:12] for n in outcome.removed),
                     max_bytes)
        if not outcome.fits:
            hold.close()
            return None
        hold.reserve(max(expected, own))
        return hold
