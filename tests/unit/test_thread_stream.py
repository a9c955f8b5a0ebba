"""service/api/thread_stream.py: a blocking writer's bytes streamed to a coroutine, a bounded
number at once, with the writer's thread and slot back whatever the reader does."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import IO

import pytest

from harness import until
from service.api.thread_stream import ThreadStreams


def _writer(total: int, piece: int = 100_000, done: threading.Event | None = None):
    def write(sink: IO[bytes]) -> None:
        try:
            for start in range(0, total, piece):
                sink.write(bytes([start // piece % 256]) * min(piece, total - start))
        finally:
            if done is not None:
                done.set()
    return write


async def _opens_again(streams: ThreadStreams) -> None:
    """Wait until a stream can be opened (a slot came back), and read it through."""
    deadline = time.monotonic() + 5.0
    while (body := streams.open(_writer(10), "again")) is None:
        assert time.monotonic() < deadline, "no slot came back"
        await asyncio.sleep(0.02)
    assert b"".join([chunk async for chunk in body]) == b"\0" * 10


def test_a_stream_carries_every_byte_in_bounded_chunks() -> None:
    async def main() -> None:
        streams = ThreadStreams(2, "test-stream", chunk_bytes=64 * 1024)
        body = streams.open(_writer(1_000_000), "test")
        assert body is not None
        chunks = [chunk async for chunk in body]
        assert sum(map(len, chunks)) == 1_000_000 and max(map(len, chunks)) <= 64 * 1024
        expected = b"".join(bytes([i % 256]) * min(100_000, 1_000_000 - i * 100_000) for i in range(10))
        assert b"".join(chunks) == expected
    asyncio.run(main())


def test_streams_past_the_limit_are_refused_until_one_ends() -> None:
    async def main() -> None:
        streams = ThreadStreams(1, "test-stream", chunk_bytes=1024, depth=2)
        first = streams.open(_writer(100_000), "first")
        assert first is not None
        assert streams.open(_writer(10), "second") is None  # the writer waits on its reader
        assert sum([len(chunk) async for chunk in first]) == 100_000
        await _opens_again(streams)
    asyncio.run(main())




def test_readers_that_leave_give_the_writer_thread_and_slot_back() -> None:
    """The bug this module fixes: six exports aborted mid-stream held five of the default
    pool's six threads for good, and every route running in that pool hung."""
    async def main() -> None:
        streams = ThreadStreams(2, "test-stream", chunk_bytes=1024, depth=2)
        for _ in range(6):
            done = threading.Event()
            body = streams.open(_writer(10_000_000, done=done), "left")
            assert body is not None
            async for _ in body:
                break  # the client left after its first chunk
            await body.aclose()
            await until(done.is_set, "the writer to stop", timeout=5.0, interval=0.02)  # within a poll
        bodies = [streams.open(_writer(10), f"after {i}") for i in range(2)]
        assert all(body is not None for body in bodies)  # both slots came back
        for body in bodies:
            assert b"".join([chunk async for chunk in body]) == b"\0" * 10
    asyncio.run(main())


def test_a_stream_nobody_reads_gives_up_after_its_stall_time() -> None:
    async def main() -> None:
        streams = ThreadStreams(1, "test-stream", chunk_bytes=1024, depth=2, stall_s=1.0)
        done = threading.Event()
        body = streams.open(_writer(1_000_000, done=done), "unread")
        assert body is not None  # never iterated: an answer that never started
        started = time.monotonic()
        await until(done.is_set, "the writer to stop", timeout=5.0, interval=0.02)
        assert 0.9 < time.monotonic() - started < 4.0
        await _opens_again(streams)
    asyncio.run(main())


def test_a_writer_that_fails_ends_its_reader_short_and_frees_its_slot() -> None:
    def failing(sink: IO[bytes]) -> None:
        sink.write(b"x" * 5000)
        raise ValueError("the store went away")

    async def main() -> None:
        streams = ThreadStreams(1, "test-stream", chunk_bytes=1024, depth=2)
        body = streams.open(failing, "failing")
        assert body is not None
        received = b"".join([chunk async for chunk in body])  # ends, does not hang
        assert len(received) <= 5000
        await _opens_again(streams)
    asyncio.run(asyncio.wait_for(main(), 10))


@pytest.mark.parametrize("limit", [1, 3])
def test_the_limit_is_the_number_of_streams_running(limit: int) -> None:
    async def main() -> None:
        streams = ThreadStreams(limit, "test-stream", chunk_bytes=1024, depth=1)
        bodies = [streams.open(_writer(1_000_000), f"s{i}") for i in range(limit)]
        assert all(body is not None for body in bodies)
        assert streams.open(_writer(10), "one more") is None
        for body in bodies:  # each read a little, then left
            assert await anext(body)  # type: ignore[arg-type]
            await body.aclose()  # type: ignore[union-attr]
        await _opens_again(streams)
    asyncio.run(main())
