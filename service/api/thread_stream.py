"""An answer streamed from a blocking writer in a worker thread, with no thread on the
reading side and a bounded number running at once.

The review export (a zip written by :func:`models.review_export.export_zip`, which only knows
file objects) ran its writer with ``run_in_executor(None, ...)`` and read each chunk with
``asyncio.to_thread(queue.get)``: two threads of the process's default pool per export (six
threads on a 2-core host). A client that left while the reader waited left that reader
blocked for good, since the writer, seeing the client gone, put no end marker: six aborted
exports held five of the six threads, and every route that runs in that pool (the review
store, threshold writes, model reloads) hung until a restart. Six exports at once deadlocked
the same way, every writer holding a thread its reader needed.

Here the writer runs in a pool of its own, ``limit`` wide; one more stream than that is
refused (:meth:`ThreadStreams.open` returns ``None``: the route answers 503). Chunks reach the
event loop through an :class:`asyncio.Queue` of ``depth`` entries that the writer fills with
``run_coroutine_threadsafe``, so the reading side is a coroutine. The writer gives up, and its
thread and slot come back, when the reader is gone, or when the queue has had no room for
``stall_s`` (a reader that stopped, or an answer that never started: the connection layer
cuts off a client that takes nothing for the request deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import IO

log = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a writer waiting for room looks whether its reader is gone


class ReaderGone(OSError):
    """Raised in the writer's thread: nobody will read what it writes."""


class ThreadStreams:
    """At most ``limit`` streams at once, each writing through a :class:`_Sink` in its own thread."""

    def __init__(self, limit: int, name: str, chunk_bytes: int = 256 * 1024, depth: int = 8,
                 stall_s: float = 30.0) -> None:
        self.limit, self.chunk_bytes, self.depth, self.stall_s = limit, chunk_bytes, depth, stall_s
        self._slots = threading.BoundedSemaphore(limit)
        self._pool = concurrent.futures.ThreadPoolExecutor(limit, thread_name_prefix=name)

    def open(self, write: Callable[[IO[bytes]], object], what: str) -> AsyncIterator[bytes] | None:
        """Start ``write(sink)`` in a thread now; its bytes, in chunks, as they come. ``None``
        when ``limit`` streams are running (nothing started)."""
        if not self._slots.acquire(blocking=False):
            return None
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(self.depth)
        gone = threading.Event()
        sink = _Sink(loop, chunks, gone, self.chunk_bytes, self.stall_s)

        def run() -> None:
            try:
                write(sink)  # type: ignore[arg-type]
                sink.put(None)
            except Exception as exc:  # the answer has started: a reader still there sees it cut short
                if isinstance(exc, ReaderGone):
                    log.info("%s stopped: %s", what, exc)
                else:
                    log.error("%s failed: %s", what, exc)
                _end(loop, chunks)
            finally:
                self._slots.release()

        try:
            self._pool.submit(run)
        except RuntimeError:  # the pool is shut down (the process is stopping)
            self._slots.release()
            raise
        return _read(chunks, gone)


async def _read(chunks: asyncio.Queue[bytes | None], gone: threading.Event) -> AsyncIterator[bytes]:
    try:
        while (chunk := await chunks.get()) is not None:
            yield chunk
    finally:
        gone.set()  # the writer stops at its next chunk, or within _POLL_S waiting for room


def _end(loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue[bytes | None]) -> None:
    """End the reader's stream after a writer that stopped early, whether or not the queue is
    full (what did not fit is dropped: the stream is cut short either way)."""
    def end() -> None:
        while chunks.full():
            chunks.get_nowait()
        chunks.put_nowait(None)
    try:
        loop.call_soon_threadsafe(end)
    except RuntimeError:  # the loop is closed
        pass


class _Sink:
    """A write-only, unseekable file for the writer (``zipfile`` then writes data descriptors)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, chunks: asyncio.Queue[bytes | None],
                 gone: threading.Event, chunk_bytes: int, stall_s: float) -> None:
        self._loop, self._chunks, self._gone = loop, chunks, gone
        self._chunk_bytes, self._stall_s = chunk_bytes, stall_s

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        for start in range(0, len(view), self._chunk_bytes):
            self.put(bytes(view[start:start + self._chunk_bytes]))
        return len(view)

    def flush(self) -> None:
        pass

    def put(self, chunk: bytes | None) -> None:
        """Hand ``chunk`` to the reader, waiting while its queue is full."""
        if self._gone.is_set():
            raise ReaderGone("the client left")
        try:
            future = asyncio.run_coroutine_threadsafe(self._chunks.put(chunk), self._loop)
        except RuntimeError as exc:  # the loop is closed
            raise ReaderGone("the server is stopping") from exc
        waited = 0.0
        while True:
            try:
                future.result(timeout=_POLL_S)
                return
            except concurrent.futures.TimeoutError:
                waited += _POLL_S
                if self._gone.is_set() or waited >= self._stall_s:
                    future.cancel()
                    raise ReaderGone("the client left" if self._gone.is_set()
                                     else f"nothing read for {self._stall_s:g} s") from None
