"""The names the operating system shows for this server's processes and threads.

``top -H``, ``ps -L -o comm``, ``/proc/<pid>/task/<tid>/comm``, ``perf`` and py-spy show a
thread by its kernel name, which Python (before 3.14) leaves as the process's name for
every thread. Named threads let an operator see which part of the server holds a core, and
let the front-end benchmark (``loadtests/frontend.py``) split the server's CPU into the
engine's and the rest's: the engine thread of a batcher is ``engine-<category>_0``, and the
threads an engine backend starts while it is built (onnxruntime's intra-op pool, OpenMP's)
inherit ``engine-<category>`` from the thread that builds it.

Linux only (``prctl``); elsewhere every call is a no-op. Kernel names are at most 15 bytes.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_PR_SET_PDEATHSIG, _PR_SET_NAME, _PR_GET_NAME = 1, 15, 16
_MAX_NAME = 15
ENGINE_PREFIX = "engine-"  # threads that run an engine, and those an engine started


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()


def set_thread_name(name: str) -> None:
    """Name the calling thread (the process's main thread names the process)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, name.encode(errors="replace")[:_MAX_NAME], 0, 0, 0)


def thread_name() -> str:
    """The calling thread's kernel name ("" where it cannot be read)."""
    if _PRCTL is None:
        return ""
    buf = ctypes.create_string_buffer(_MAX_NAME + 1)
    _PRCTL(_PR_GET_NAME, buf, 0, 0, 0)
    return buf.value.decode(errors="replace")


@contextmanager
def thread_named(name: str) -> Iterator[None]:
    """The calling thread carries ``name`` for the block (threads started in it keep it)."""
    previous = thread_name()
    set_thread_name(name)
    try:
        yield
    finally:
        if previous:
            set_thread_name(previous)


def task_names(pid: int | str = "self") -> dict[int, str]:
    """The kernel names of ``pid``'s threads by thread id, as ``top -H`` shows them (from
    ``/proc``; empty where there is none, and threads that exit meanwhile are left out)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    names = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names[int(tid)] = f.read().strip()
        except OSError:
            continue
    return names


def engine_thread_name(category: str) -> str:
    return f"{ENGINE_PREFIX}{category}"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Receive ``sig`` when the parent process dies, however it dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
