"""The supervisor's run directory in TMPDIR: the engine socket, the multi-process metrics and
the front ends' heatmap links; held under a lock while its supervisor lives, swept when one
was killed."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from service.config import Settings

RUN_DIR_PREFIX = "msflow-serve-"


def lock_run_dir(rundir: Path) -> int:
    """Hold ``rundir/lock`` for as long as this process lives: the kernel lets go of it however
    the process ends, which is how :func:`sweep_run_dirs` tells a live server's folder from a
    killed one's. Locked under another name first, so that no sweep finds it unlocked."""
    fd = os.open(rundir / "lock.new", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(rundir / "lock.new", rundir / "lock")
    return fd


def sweep_run_dirs(tmp: Path) -> list[Path]:
    """Remove the run directories (links, metrics) that killed supervisors left in ``tmp``: a
    SIGKILL, or a container OOM-killed whole, whose Kubernetes emptyDir ``/tmp`` outlives it
    into the restarted container, up to N x MSFLOW_HEATMAP_MEMORY_BYTES each time. Only this
    user's, with a lock no process holds; those of older versions (no lock) are left."""
    removed = []
    for rundir in tmp.glob(RUN_DIR_PREFIX + "*"):
        try:
            if rundir.is_symlink() or rundir.stat().st_uid != os.getuid():
                continue
            fd = os.open(rundir / "lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its supervisor lives
            os.close(fd)
            continue
        try:
            shutil.rmtree(rundir, ignore_errors=True)
            removed.append(rundir)
        finally:
            os.close(fd)
    return removed


def frontend_links(links_dir: Path, index: int) -> Path:
    """Front end ``index``'s folder of heatmap links: two digits, which also start its link ids."""
    return links_dir / f"{index:02d}"


def mode_warnings(settings: Settings, links_dir: Path) -> list[str]:
    """What may not hold with these settings on this host, said once at start."""
    # Each front end keeps up to MSFLOW_HEATMAP_MEMORY_BYTES of links as files there; a file
    # that does not fit stays in its front end's memory, and the other front ends answer 404.
    need = settings.api_processes * settings.heatmap_memory_bytes
    free = shutil.disk_usage(links_dir).free
    if free < need:
        return [f"{links_dir}: {free / 2**20:.0f} MiB free, below MSFLOW_API_PROCESSES x MSFLOW_HEATMAP_MEMORY_BYTES "
                f"({need / 2**20:.0f} MiB) of heatmap=url links as files; past it a link is served only by the "
                "front end that made it (point TMPDIR at a larger file system, or lower the budget)"]
    return []
