"""One supervised child process: how it starts, when it restarts, and whether its event loop
still runs (the beats it sends over a socket pair, :mod:`service.ipc.heartbeat`)."""

from __future__ import annotations

import logging
import socket
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable

log = logging.getLogger("service.supervisor")

_RESTART_BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 10.0  # a child that lived this long restarts at once; one that died sooner waits


class Child:
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



def next_backoff(backoff_s: float) -> float:
    """The wait before a restart after one that came to nothing (died soon, or never started)."""
    return min(_RESTART_BACKOFF_MAX_S, max(0.5, backoff_s * 2))
