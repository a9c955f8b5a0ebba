"""``msflow serve``: one server process, or a supervisor of front ends and one engine process.

With ``MSFLOW_API_PROCESSES`` = 1 (the default) the whole service runs in this process
(:func:`service.server.run_server`). With N > 1 this process binds the port and supervises:

* N front-end processes (``msflow-api-<i>``): uvicorn on a listening socket of its own on the
  one port (``SO_REUSEPORT``), the whole HTTP API, decode, postprocess, result cache, review
  capture; each a normal
  :class:`~service.pipeline.state.ServiceState` whose lanes reach the engine process
  (:mod:`service.pipeline.engine_client`);
* one engine process (``msflow-engine``, :mod:`service.engine_core`): every engine, and
  the only place batches form, so N front ends do not split a category's batches N ways.

Why processes at all: one process shares one GIL between HTTP, decode and encode; at about
1.4 ms of Python per image it tops out near 700 images/s (docs/performance-log.md), far below
what one GPU can score. Why one engine process rather than an engine per front end: batch
size is what makes a GPU efficient, and N engines would also hold N copies of each model.

Why a socket per front end: on one shared socket the kernel hands each new connection to
whichever process accepts first, so a few long-lived keep-alive clients can all land on one
front end (measured: 8 of 8). With ``SO_REUSEPORT`` the kernel spreads connections over the
front ends by hash. Each front end's socket is bound here but only starts listening when its
uvicorn serves, so no connection waits on a process still starting; it closes with the
process, so none waits on a dead one either. This process keeps the port with a bound socket
that never listens.

Children die with this process (``PR_SET_PDEATHSIG``) and are restarted when they die
alone, and a front end whose event loop has not run for ``MSFLOW_FRONTEND_STALL_S`` (stopped,
or stuck in a call that never returns: its socket stays on the port and the kernel goes on
handing it connections, which would wait for as long as it stays stuck) is killed first;
shared memory needs no cleaning after any of these deaths (:mod:`service.ipc.slab`).
A front end's ``heatmap=url`` links are files in its folder of the run directory, which every
front end reads (:class:`service.redisq.store.FolderLinks`); a dead front end's folder is
removed here before its replacement starts, and the run directory when this process stops.
On SIGTERM/SIGINT the front ends stop first (readiness off, requests in flight finish,
their images still get engine time), then the engine process drains and exits.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from prometheus_client.multiprocess import mark_process_dead

from service.api.auth import access_summary
from service.config import Settings, warn_unknown_env
from service.engine_core import run_engine_process
from service.os_names import die_with_parent, set_thread_name
from service.server import build_overrides, build_settings, run_server

log = logging.getLogger(__name__)

_RUN_DIR_PREFIX = "msflow-serve-"
_RESTART_BACKOFF_MAX_S = 10.0
_STABLE_AFTER_S = 10.0  # a child that lived this long restarts at once; one that died sooner waits
_TICK_LATE_S = 2.0  # a watch tick this late: the supervisor itself did not run meanwhile


def serve(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_unknown_env()
    if settings.api_processes == 1:
        return run_server(settings)
    return Supervisor(settings, build_overrides(args)).run()


def become_child(name: str) -> None:
    """Linux (a no-op elsewhere): get SIGTERM when the supervisor dies, however it dies (no
    orphans), and show ``name`` in ``ps -o comm``, ``top`` and ``/proc/<pid>/comm``."""
    die_with_parent(signal.SIGTERM)
    set_thread_name(name)  # the main thread's name is the process's
    if os.getppid() == 1:  # the parent died before the line above ran
        os.kill(os.getpid(), signal.SIGTERM)


def run_frontend(overrides: dict[str, Any], sockets: list[socket.socket], index: int,
                 beat: socket.socket | None) -> None:
    """Entry point of front-end process ``index`` (``beat``: where its loop says it runs)."""
    become_child(f"msflow-api-{index}")
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s api-{index} %(name)s: %(message)s")
    sys.exit(run_server(settings, sockets, beat))


def run_engine(overrides: dict[str, Any], socket_path: str, beat: socket.socket | None) -> None:
    become_child("msflow-engine")
    run_engine_process(overrides, socket_path, beat)


class _Child:
    """One supervised process: how to start it (given the socket its loop beats on, where it is
    watched: ``stall_s``), its restart back-off, and when its loop was last heard from."""

    def __init__(self, name: str, start: Callable[[socket.socket | None], BaseProcess], leaves: Path | None = None,
                 stall_s: float | None = None) -> None:
        self.name = name
        self._start = start
        self.leaves = leaves  # a folder of its own, removed when it dies
        self.stall_s = stall_s
        self.process: BaseProcess | None = None
        self.started_at = 0.0
        self.backoff_s = 0.0
        self.restart_at: float | None = None
        self._beats: socket.socket | None = None  # this end of the current process's heartbeat
        # Judged only once heard: imports and the app's assembly come before its loop runs.
        self._heard_at: float | None = None

    def start(self) -> None:
        self.forget_beats()
        if self.stall_s:
            mine, theirs = socket.socketpair()
            try:
                self.process = self._start(theirs)
            except BaseException:
                mine.close()
                raise
            finally:
                theirs.close()  # the child has its own copy
            mine.setblocking(False)
            self._beats = mine
        else:
            self.process = self._start(None)
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("%s: pid %s", self.name, self.process.pid)

    def silent_for(self, now: float) -> float | None:
        """Seconds since this child's loop was last heard, where that is past ``stall_s``."""
        if self._beats is None:
            return None
        try:
            while self._beats.recv(4096):
                self._heard_at = now
        except BlockingIOError:  # nothing more to read now
            pass
        except OSError:  # its end closed: it died, which the restart handles
            return None
        if self._heard_at is None or self.stall_s is None or now - self._heard_at <= self.stall_s:
            return None
        return now - self._heard_at

    def excuse(self, now: float) -> None:
        """This process did not run either (stopped, the container paused): a new window."""
        if self._heard_at is not None:
            self._heard_at = now

    def forget_beats(self) -> None:
        if self._beats is not None:
            self._beats.close()
        self._beats = None
        self._heard_at = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class Supervisor:
    def __init__(self, settings: Settings, overrides: dict[str, Any]) -> None:
        self.settings = settings
        self.overrides = overrides
        self._stopping = False

    def run(self) -> int:
        # Mode 0700: only this user reaches the socket and the links. In TMPDIR (else /tmp), not
        # /dev/shm: the front ends' links take up to N x MSFLOW_HEATMAP_MEMORY_BYTES there, and
        # Docker's /dev/shm is 64 MiB; on a disk the page cache keeps the links it serves.
        for stale in sweep_run_dirs(Path(tempfile.gettempdir())):
            log.warning("removed %s, the run directory of an msflow serve that was killed", stale)
        rundir = Path(tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX))
        try:
            lock = _lock_run_dir(rundir)
            try:
                return self._run(rundir)
            finally:
                os.close(lock)
        finally:  # a start that fails too (the port taken): nothing left in TMPDIR
            shutil.rmtree(rundir, ignore_errors=True)

    def _run(self, rundir: Path) -> int:
        s = self.settings
        metrics_dir = rundir / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # inherited by every child
        engine_socket = rundir / "engine.sock"
        links_dir = rundir / "links"
        links_dir.mkdir()
        overrides = {**self.overrides, "engine_socket": str(engine_socket)}
        port_holder = reuseport_socket(s.host, s.port, exclusive=True)
        port = port_holder.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")  # no forked copies of threads, locks or CUDA state
        # Its loop watched too: stopped, it answers no front end (their requests 504, their
        # readiness engine_stalled) and its own stall watch, a thread of it, is stopped with it.
        engine = _Child("engine process", lambda beat: _spawn(ctx, run_engine, "msflow-engine",
                                                              overrides, str(engine_socket), beat),
                        stall_s=s.engine_stall_s or None)

        def start_frontend(i: int, beat: socket.socket | None) -> BaseProcess:
            listener = reuseport_socket(s.host, port)
            try:
                return _spawn(ctx, run_frontend, f"msflow-api-{i}",
                              {**overrides, "heatmap_links_dir": str(frontend_links(links_dir, i))}, [listener], i,
                              beat)
            finally:
                listener.close()  # the child has its own copy: the socket lives exactly as long as it

        frontends = [_Child(f"front end {i}", lambda beat, i=i: start_frontend(i, beat), frontend_links(links_dir, i),
                            stall_s=s.frontend_stall_s or None)
                     for i in range(s.api_processes)]
        children = [engine, *frontends]
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info("serving %s on http://%s:%d with %d front-end processes and one engine process (engine %s, "
                 "batch %d, delay %.1f ms; %s)", s.model_store, s.host, port, s.api_processes, s.engine,
                 s.max_batch_size, s.max_queue_delay_ms, access_summary(s))
        for warning in mode_warnings(s, links_dir):
            log.warning("%s", warning)
        try:
            for child in children:
                child.start()
            last_tick = time.monotonic()
            while not self._stopping:
                time.sleep(0.2)
                now = time.monotonic()
                if now - last_tick > _TICK_LATE_S:  # this process was stopped too: no child is judged on it
                    for child in children:
                        child.excuse(now)
                last_tick = now
                for child in children:
                    self._look_after(child, metrics_dir)
            self._stop(frontends, engine, metrics_dir)
        finally:
            for child in children:
                if child.alive:
                    assert child.process is not None
                    child.process.kill()
            port_holder.close()
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("signal %d: stopping the front ends, then the engine process", signum)
        self._stopping = True

    def _look_after(self, child: _Child, metrics_dir: Path) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self._stopping:
                try:
                    child.start()
                except Exception:
                    # Out of descriptors or memory for a moment (EMFILE, fork's ENOMEM/EAGAIN):
                    # raised out of run(), it would stop every healthy child with this one.
                    # Tried again later instead, with the back-off of a child that keeps dying.
                    child.backoff_s = _next_backoff(child.backoff_s)
                    child.restart_at = now + child.backoff_s
                    log.exception("%s: cannot start a new one; trying again in %.1f s", child.name, child.backoff_s)
            return
        if child.alive and (silent_s := child.silent_for(now)) is not None:
            assert child.process is not None
            # SIGKILL: a stopped process gets nothing else until it runs again, and a loop stuck
            # in a call never runs a signal handler. Its death is then handled as any other.
            log.error("%s (pid %s) has not run its event loop for %.1f s (stopped, or stuck); killing it",
                      child.name, child.process.pid, silent_s)
            child.process.kill()
            return
        if child.alive or child.process is None:
            return
        child.forget_beats()
        pid, code = child.process.pid, child.process.exitcode
        if pid is not None:
            mark_process_dead(pid, str(metrics_dir))  # its live gauges leave /metrics
        if child.leaves is not None:  # its links: no process bounds that folder any more
            shutil.rmtree(child.leaves, ignore_errors=True)
        lived = now - child.started_at
        child.backoff_s = 0.0 if lived >= _STABLE_AFTER_S else _next_backoff(child.backoff_s)
        log.error("%s (pid %s) exited with %s after %.1f s; restarting%s", child.name, pid, code, lived,
                  f" in {child.backoff_s:.1f} s" if child.backoff_s else "")
        child.restart_at = now + child.backoff_s

    def _stop(self, frontends: list[_Child], engine: _Child, metrics_dir: Path) -> None:
        s = self.settings
        for child in frontends:
            _signal(child, signal.SIGTERM)
        _join(frontends, s.graceful_shutdown_s + s.shutdown_delay_s + 5.0)
        _signal(engine, signal.SIGTERM)
        _join([engine], s.graceful_shutdown_s + 5.0)
        for child in [*frontends, engine]:
            if child.process is not None and child.process.pid is not None:
                mark_process_dead(child.process.pid, str(metrics_dir))


def _lock_run_dir(rundir: Path) -> int:
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
    for rundir in tmp.glob(_RUN_DIR_PREFIX + "*"):
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


def _next_backoff(backoff_s: float) -> float:
    """The wait before a restart after one that came to nothing (died soon, or never started)."""
    return min(_RESTART_BACKOFF_MAX_S, max(0.5, backoff_s * 2))


def reuseport_socket(host: str, port: int, exclusive: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening yet (asyncio's
    ``create_server`` calls ``listen`` when uvicorn starts serving on it). Port 0 picks a free
    port; bind the next ones to the port it got.

    ``exclusive``: first make sure nothing serves the port. ``SO_REUSEPORT`` lets any process
    of the same user bind it too, so a second ``msflow serve`` on the port of one still running
    (an old deployment that survived its stop) started without an error, and the kernel split
    the connections between the two servers and their model versions. A socket without the
    option cannot bind beside a listening one that has it: that bind is the check."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if exclusive and port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no server
            probe.bind((host, port))  # OSError EADDRINUSE while anything listens there
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _spawn(ctx: Any, target: Callable[..., None], name: str, *args: Any) -> BaseProcess:
    process: BaseProcess = ctx.Process(target=target, args=args, name=name)
    process.start()
    return process


def _signal(child: _Child, signum: int) -> None:
    if child.alive:
        assert child.process is not None and child.process.pid is not None
        try:
            os.kill(child.process.pid, signum)
        except ProcessLookupError:
            pass


def _join(children: list[_Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.process is not None:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("%s did not stop within %.0f s; killing it", child.name, timeout_s)
                child.process.kill()
                child.process.join(5.0)
