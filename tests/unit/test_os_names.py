"""Kernel thread names (service.os_names): set, restored, inherited by threads started under them."""

from __future__ import annotations

import os
import threading
import time

from service.os_names import engine_thread_name, set_thread_name, task_names, thread_name, thread_named


def comm(tid: int) -> str:
    return task_names()[tid]  # the kernel's view (/proc), not prctl's


def in_thread(fn):  # type: ignore[no-untyped-def]
    out = {}
    t = threading.Thread(target=lambda: out.update(value=fn()))
    t.start()
    t.join()
    return out["value"]


def test_a_thread_name_is_set_truncated_and_restored() -> None:
    def body() -> tuple[str, str, str, str]:
        before = thread_name()
        with thread_named(engine_thread_name("a-very-long-category-name")):
            inside = comm(threading.get_native_id())
            read_back = thread_name()
        return before, inside, read_back, comm(threading.get_native_id())

    before, inside, read_back, after = in_thread(body)
    assert inside == read_back == "engine-a-very-l"  # the kernel keeps 15 bytes
    assert after == before != inside


def test_threads_started_under_a_name_inherit_it() -> None:
    """What names onnxruntime's pool threads: they start while the engine is built."""
    def body() -> str:
        set_thread_name("builder")
        with thread_named("engine-brick"):
            return in_thread(lambda: comm(threading.get_native_id()))

    assert in_thread(body) == "engine-brick"


def test_task_names_lists_every_live_thread_of_a_process() -> None:
    ready, done = threading.Event(), threading.Event()
    tid: dict[str, int] = {}

    def body() -> None:
        set_thread_name("listed-thread")
        tid["value"] = threading.get_native_id()
        ready.set()
        done.wait(10)

    t = threading.Thread(target=body)
    t.start()
    ready.wait(10)
    try:
        names = task_names()
        assert names[tid["value"]] == "listed-thread" and threading.get_native_id() in names
        assert task_names(os.getpid()).keys() >= {tid["value"], threading.get_native_id()}
    finally:
        done.set()
        t.join()
    # Gone once the kernel has reaped it (join returns a moment before; the id may even be
    # reused by a new thread, under another name).
    deadline = time.monotonic() + 5
    while task_names().get(tid["value"]) == "listed-thread" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert task_names().get(tid["value"]) != "listed-thread"
    assert task_names(2**22 + 1) == {}  # no such process
