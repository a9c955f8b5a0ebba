"""The supervisor of N front ends and one engine process (``MSFLOW_API_PROCESSES`` > 1): the
process tree's start, its watch (deaths, silent event loops) and its ordered stop; what the
mode is and why: :mod:`service.supervisor`."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from prometheus_client.multiprocess import mark_process_dead

from service.api.auth import access_summary
from service.config import Settings
from service.engine_core import run_engine_process
from service.os_names import die_with_parent, set_thread_name
from service.server import run_server
from service.supervisor.children import STABLE_AFTER_S, Child, next_backoff
from service.supervisor.port import reuseport_socket
from service.supervisor.run_dir import RUN_DIR_PREFIX, frontend_links, lock_run_dir, mode_warnings, sweep_run_dirs

log = logging.getLogger("service.supervisor")

_TICK_LATE_S = 2.0  # a watch tick this late: the supervisor itself did not run meanwhile


def become_child(name: str) -> None:
    """Linux (a no-op elsewhere): get SIGTERM when the supervisor dies, however it dies (no
    orphans), and show ``name`` in ``ps -o comm``, ``top`` and ``/proc/<pid>/comm``.

    Ctrl-C reaches every process of the group, and stopping is the supervisor's (front ends
    first, then the engine process, by SIGTERM): a child ignores SIGINT. It was started with
    SIGINT blocked (:func:`_spawn`), so one that came during its imports is pending, and
    ignoring it discards it; unhandled, it ended the child in a KeyboardInterrupt traceback
    that read as a crash. A front end's uvicorn still takes SIGINT while it serves (its drain
    starts at once, a second forces it as in one process) and re-raises it into the ignore."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
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



class Supervisor:
    def __init__(self, settings: Settings, overrides: dict[str, Any]) -> None:
        self.settings = settings
        self.overrides = overrides
        self._stopping = False
        self._stopped_by: int | None = None  # the first stop signal

    def run(self) -> int:
        # Mode 0700: only this user reaches the socket and the links. In TMPDIR (else /tmp), not
        # /dev/shm: the front ends' links take up to N x MSFLOW_HEATMAP_MEMORY_BYTES there, and
        # Docker's /dev/shm is 64 MiB; on a disk the page cache keeps the links it serves.
        for stale in sweep_run_dirs(Path(tempfile.gettempdir())):
            log.warning("removed %s, the run directory of an msflow serve that was killed", stale)
        rundir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
        try:
            lock = lock_run_dir(rundir)
            try:
                code = self._run(rundir)
            finally:
                os.close(lock)
        finally:  # a start that fails too (the port taken): nothing left in TMPDIR
            shutil.rmtree(rundir, ignore_errors=True)
        if self._stopped_by == signal.SIGINT:
            # Ctrl-C ends the command as it ends one process: msflow.cli's main says
            # "interrupted" and dies by SIGINT, so a calling script stops too (it ended 0).
            raise KeyboardInterrupt
        return code

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
        engine = Child("engine process", lambda beat: _spawn(ctx, run_engine, "msflow-engine",
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

        frontends = [Child(f"front end {i}", lambda beat, i=i: start_frontend(i, beat), frontend_links(links_dir, i),
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
            self._stopped_by = signum
        self._stopping = True

    def _look_after(self, child: Child, metrics_dir: Path) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self._stopping:
                try:
                    child.start()
                except Exception:
                    # Out of descriptors or memory for a moment (EMFILE, fork's ENOMEM/EAGAIN):
                    # raised out of run(), it would stop every healthy child with this one.
                    # Tried again later instead, with the back-off of a child that keeps dying.
                    child.backoff_s = next_backoff(child.backoff_s)
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
        if child.alive or child.process is None or self._stopping:
            return  # stopping: a child that ended is no death to restart (_stop reaps it)
        child.forget_beats()
        pid, code = child.process.pid, child.process.exitcode
        if pid is not None:
            mark_process_dead(pid, str(metrics_dir))  # its live gauges leave /metrics
        if child.leaves is not None:  # its links: no process bounds that folder any more
            shutil.rmtree(child.leaves, ignore_errors=True)
        lived = now - child.started_at
        child.backoff_s = 0.0 if lived >= STABLE_AFTER_S else next_backoff(child.backoff_s)
        log.error("%s (pid %s) exited with %s after %.1f s; restarting%s", child.name, pid, code, lived,
                  f" in {child.backoff_s:.1f} s" if child.backoff_s else "")
        child.restart_at = now + child.backoff_s

    def _stop(self, frontends: list[Child], engine: Child, metrics_dir: Path) -> None:
        s = self.settings
        for child in frontends:
            _signal(child, signal.SIGTERM)
        _join(frontends, s.graceful_shutdown_s + s.shutdown_delay_s + 5.0)
        _signal(engine, signal.SIGTERM)
        _join([engine], s.graceful_shutdown_s + 5.0)
        for child in [*frontends, engine]:
            if child.process is not None and child.process.pid is not None:
                mark_process_dead(child.process.pid, str(metrics_dir))


def _spawn(ctx: Any, target: Callable[..., None], name: str, *args: Any) -> BaseProcess:
    """A child started with SIGINT blocked, which its exec keeps until :func:`become_child`
    ignores it: a Ctrl-C during its imports is not its to act on. Blocked here rather than
    ignored: one that reaches this process meanwhile is delivered after, not lost."""
    process: BaseProcess = ctx.Process(target=target, args=args, name=name)
    # Started first, outside the block: starting it in process.start() unblocks SIGINT after
    # (the first child, the engine process, came up with SIGINT deliverable).
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return process


def _signal(child: Child, signum: int) -> None:
    if child.alive:
        assert child.process is not None and child.process.pid is not None
        try:
            os.kill(child.process.pid, signum)
        except ProcessLookupError:
            pass


def _join(children: list[Child], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for child in children:
        if child.process is not None:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("%s did not stop within %.0f s; killing it", child.name, timeout_s)
                child.process.kill()
                child.process.join(5.0)
