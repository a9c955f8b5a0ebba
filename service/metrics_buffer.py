"""Multi-process metric values kept in process memory, written to prometheus-client's files in one go.

In multi-process mode (``PROMETHEUS_MULTIPROC_DIR``) prometheus-client writes every update
through to a memory-mapped file, under a lock, after a process-id check: a gauge set cost
~12,300 instructions against ~8,300 in one process, a histogram observation ~21,700 against
~12,300 (callgrind, docs/performance-log.md), and a front end makes ~9 a request, the engine
process ~7 an image. :class:`BufferedValue` (installed by :mod:`service.metrics_multiprocess` as
prometheus-client's value class in that mode) keeps the running value in memory as the
library does, and only marks it changed; :func:`flush` writes every changed value in one go.
The value written is the same float the library would have written after the same updates
(the same additions in the same order), so what a scrape reads is exact, not an estimate.

Flushes: every :data:`FLUSH_INTERVAL_S` (a daemon thread: every process that writes metrics
has it, with no start-up wiring, and a busy event loop does not hold it back); before every
exposition, in every process (the front end that serves ``/metrics`` asks the others through
the engine process: :data:`FLUSH_TOPIC`); at exit (``atexit``, and a server's end: uvicorn lets
the SIGTERM it drained for end the process, where no ``atexit`` runs, so :mod:`service.server`
flushes before); and before a fork. A process killed outright (SIGKILL, a crash) loses at most its last interval's updates.

A gauge of a ``mostrecent`` mode is set with a timestamp that orders the processes' values:
it is written at once, as before (those are read at scrape time, off the hot path).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import Any

from prometheus_client import values

try:  # prometheus-client's own file format, not its public API: checked at install()
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
except ImportError:  # pragma: no cover - a release that moved them: install() keeps the library's value
    MmapedDict = mmap_key = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

# A gather topic (service.pipeline.peer_gathers): every process writes its values now.
FLUSH_TOPIC = "metrics-flush"
FLUSH_INTERVAL_S = 1.0

_lock = threading.Lock()  # the values, the changed list and the files
_files: dict[str, MmapedDict] = {}  # file prefix -> this process's file of it
# Every live value of this process (reopened after a fork); weak, so that a series removed
# (a version no longer served, a retired category) is not kept for the process's life.
_values: weakref.WeakSet[BufferedValue] = weakref.WeakSet()
_changed: list[BufferedValue] = []  # values updated since the last flush, each once
_pid = os.getpid()
_flusher: threading.Thread | None = None


class BufferedValue:
    """prometheus-client's multi-process value (``values.MultiProcessValue``), written at flush
    time instead of at each update (module docstring)."""

    _multiprocess = True

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any, labelvalues: Any, help_text: str,
                 multiprocess_mode: str = "", **kwargs: Any) -> None:
        self._params = typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode
        self._changed = False
        with _lock:
            # A series made again after its removal goes on from what the old one wrote.
            _write_changed()
            self._open()
            _values.add(self)

    def _open(self) -> None:
        """This value's place in this process's file (made at 0 if new), and what it holds."""
        typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode = self._params
        prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        file = _files.get(prefix)
        if file is None:
            file = _files[prefix] = MmapedDict(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"],
                                                            f"{prefix}_{_pid}.db"))
        self._file = file
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._value, self._timestamp = file.read_value(self._key)

    def inc(self, amount: float) -> None:
        with _lock:
            self._value += amount
            if not self._changed:
                self._changed = True
                _changed.append(self)

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _lock:
            self._value = value
            if timestamp:  # a mostrecent gauge: its time says which process's value is the latest
                self._timestamp = timestamp
                self._file.write_value(self._key, value, timestamp)
            elif not self._changed:
                self._changed = True
                _changed.append(self)

    def set_exemplar(self, exemplar: Any) -> None:
        return  # none in multi-process mode (prometheus-client's value neither)

    def get(self) -> float:
        with _lock:
            return self._value

    def get_exemplar(self) -> None:
        return None


def _write_changed() -> None:
    """Write every changed value (the lock held)."""
    for value in _changed:
        value._changed = False
        value._file.write_value(value._key, value._value, value._timestamp)
    _changed.clear()


def flush() -> None:
    """Write this process's changed values to its files now (nothing to do: next to no cost)."""
    if not _changed:  # read unlocked: an update racing it is written by the next flush
        return
    with _lock:
        _write_changed()


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_INTERVAL_S)
        flush()


def _start_flusher() -> None:
    global _flusher
    _flusher = threading.Thread(target=_flush_forever, name="metrics-flush", daemon=True)
    _flusher.start()


def _after_fork_in_child() -> None:
    """The child writes files of its own, from what its own (fresh) files hold, as
    prometheus-client's value does when it notices a new process id."""
    global _lock, _pid
    if _flusher is None:
        return  # never installed
    _lock = threading.Lock()  # another thread may have held the parent's at the fork
    _pid = os.getpid()
    for file in _files.values():
        file.close()
    _files.clear()
    _changed.clear()
    for value in _values:
        value._changed = False
        value._open()
    _start_flusher()


def compatible() -> bool:
    """Whether this prometheus-client has the file layer :class:`BufferedValue` writes through
    (``mmap_dict``'s ``MmapedDict.read_value/write_value`` and ``mmap_key``, as in 0.20-0.26):
    they are the library's internals, so a release that changed them keeps its own value."""
    return (mmap_key is not None and callable(getattr(MmapedDict, "read_value", None))
            and callable(getattr(MmapedDict, "write_value", None)) and hasattr(values, "MultiProcessValue"))


def install() -> bool:
    """Make :class:`BufferedValue` prometheus-client's value class (before any metric is made).
    False, with a warning, where this prometheus-client's file layer is not the one known here:
    the caller keeps the library's own (write-through) value."""
    global _pid
    if _flusher is not None:
        return True
    if not compatible():
        log.warning("prometheus-client's multi-process file layer is not the one known here: its own "
                    "write-through values are used (correct, about 1.5x the instructions per update)")
        return False
    _pid = os.getpid()
    values.ValueClass = BufferedValue
    atexit.register(flush)
    os.register_at_fork(before=flush, after_in_child=_after_fork_in_child)
    _start_flusher()
    return True
