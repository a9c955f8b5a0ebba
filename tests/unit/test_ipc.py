"""Shared-memory slabs and the message channel between a server's processes (service/ipc)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any

import numpy as np
import pytest

from service.ipc import frames
from service.ipc.channel import Channel
from service.ipc.slab import Slab, SlabLayout, SlotPool


def test_slots_are_page_aligned_and_views_do_not_overlap() -> None:
    layout = SlabLayout(size=100, slots=3)
    assert layout.slot_bytes % os.sysconf("SC_PAGE_SIZE") == 0
    slab = Slab.create(100, 3, "test-slab")
    try:
        for slot in range(3):
            slab.input(slot)[...] = slot + 1
            slab.output(slot)[...] = -(slot + 1)
        for slot in range(3):
            assert (slab.input(slot) == slot + 1).all() and (slab.output(slot) == -(slot + 1)).all()
        with pytest.raises(IndexError):
            slab.input(3)
    finally:
        slab.close()


def test_slot_pool_takes_all_or_nothing() -> None:
    pool = SlotPool(4)
    first = pool.take(3)
    assert first is not None and len(set(first)) == 3 and pool.free == 1
    assert pool.take(2) is None and pool.free == 1  # refused whole: nothing taken
    pool.give_back(first)
    assert pool.free == 4


def test_messages_and_a_slab_descriptor_cross_the_channel() -> None:
    """The owner's writes are the peer's reads through the passed memfd, and back; messages
    arrive in order; closing one end tells the other once."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        left_sock, right_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        received: list[tuple[dict[str, Any], list[int]]] = []
        closed: list[str] = []
        got = asyncio.Event()

        def on_right(batch: list[tuple[dict[str, Any], list[int]]]) -> None:
            received.extend(batch)
            if len(received) >= 201:
                got.set()

        left = Channel(left_sock, loop, lambda batch: None, lambda: closed.append("left"), name="left")
        right = Channel(right_sock, loop, on_right, lambda: closed.append("right"), name="right")
        left.start()
        right.start()
        owner = Slab.create(8, 2, "test-channel")
        owner.input(1)[...] = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
        left.send({"op": "slab", "size": 8, "slots": 2}, [owner.fd])
        for i in range(200):  # JSON messages and packed frames interleaved, in one stream
            if i % 2:
                left.send_frame(frames.pack_submit(i, 7, 1, 12.5, [i % 2]))
            else:
                left.send({"op": "n", "i": i})
        await asyncio.wait_for(got.wait(), 10)
        (message, fds), *rest = received
        assert message == {"op": "slab", "size": 8, "slots": 2} and len(fds) == 1
        assert [m["i"] if isinstance(m, dict) else frames.unpack_submit(m).rid for m, _ in rest] == list(range(200))
        assert all(isinstance(m, bytes) == bool(i % 2) and not f for i, (m, f) in enumerate(rest))
        peer = Slab.attach(fds[0], 8, 2, "peer")
        assert (peer.input(1) == owner.input(1)).all()
        peer.output(0)[...] = 2.5  # the engine's side writes a map ...
        assert (owner.output(0) == 2.5).all()  # ... the owner reads it, no copy in between
        left.close()
        for _ in range(200):
            if len(closed) == 2:
                break
            await asyncio.sleep(0.01)
        assert sorted(closed) == ["left", "right"]
        right.send({"op": "after close"})  # dropped, not raised
        owner.close()
        peer.close()

    asyncio.run(main())


def test_a_slab_is_an_anonymous_memfd_with_no_name_to_leak() -> None:
    """Nothing in /dev/shm or on disk: the kernel frees it with its last holder, however it dies."""
    before = set(os.listdir("/dev/shm"))
    slab = Slab.create(64, 4, "test-no-name")
    try:
        assert os.readlink(f"/proc/self/fd/{slab.fd}").startswith("/memfd:test-no-name")
        assert set(os.listdir("/dev/shm")) == before
    finally:
        slab.close()


def test_steady_load_reuses_the_same_few_slots() -> None:
    """Pages of a large slab are committed as touched: one image at a time must keep using
    one slot, not walk through all of them."""
    pool = SlotPool(64)
    used = set()
    for _ in range(200):
        slots = pool.take(1)
        assert slots is not None
        used.update(slots)
        pool.give_back(slots)
    assert used == {0}


def test_submit_and_result_frames_carry_their_fields_bit_for_bit() -> None:
    frame = frames.pack_submit(2**40 + 3, 9, 2, 1234.000001, [5, 0, 63])
    assert frames.kind(frame) == frames.SUBMIT and frame[0] != ord("{")
    assert frames.unpack_submit(frame) == frames.Submit(2**40 + 3, 9, 2, 1234.000001, [5, 0, 63])
    score = float(np.float32(0.1234567))  # what an engine's float32 score becomes
    outcomes = [frames.Outcome(frames.OK, score, 8, 1.25, 3.5),
                frames.Outcome(frames.ENGINE_ERROR, message="RuntimeError: CUDA out of memory é"),
                frames.Outcome(frames.CANCELLED)]
    rid, back = frames.unpack_result(frames.pack_result(17, outcomes))
    assert rid == 17 and back == outcomes and back[0].score == score
    rid, back = frames.unpack_result(frames.pack_result(18, [frames.Outcome(frames.QUEUE_FULL)] * 3))
    assert rid == 18 and back == [frames.Outcome(frames.QUEUE_FULL)] * 3
    long = frames.pack_result(1, [frames.Outcome(frames.ENGINE_ERROR, message="x" * 5000)])
    assert len(frames.unpack_result(long)[1][0].message) == 1024  # an error's text is bounded


def test_malformed_frames_are_refused_not_misread() -> None:
    good = frames.pack_submit(1, 1, 1, 0.0, [1, 2])
    for bad in (good[:-1], good[:frames._SUBMIT.size]):  # a cut slot list; no slots at all
        with pytest.raises(ValueError):
            frames.unpack_submit(bad)
    result = frames.pack_result(1, [frames.Outcome(frames.OK, 0.5, 1, 0.0, 0.0)])
    with pytest.raises(ValueError):
        frames.unpack_result(result + b"junk")
    with pytest.raises(struct.error):
        frames.unpack_result(result[:-3])
