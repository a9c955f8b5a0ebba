"""Shared-memory slabs and the message channel between a server's processes (service/ipc)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.ipc import frames
from service.ipc.channel import Channel
from service.ipc.listener import accept_forever
from service.ipc.retry import Backoff
from service.ipc.slab import PAGE, SEALS, Slab, SlabLayout, SlotPool


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


def test_a_slots_views_are_made_once_and_a_slot_outside_the_slab_is_refused() -> None:
    slab = Slab.create(8, 2, "test-views")
    try:
        # Made on first use and kept: each side of the link asks for them once per image.
        assert slab.input(1) is slab.input(1) and slab.output(1) is slab.output(1)
        assert slab.input(0) is not slab.input(1)
        assert slab.input(1).shape == (8, 8, 3) and slab.output(1).dtype == np.float32
        for bad in (-1, 2, 99):
            with pytest.raises(IndexError, match=f"slot {bad} outside 0..1"):
                slab.input(bad)
            with pytest.raises(IndexError, match=f"slot {bad} outside 0..1"):
                slab.output(bad)
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
    # A request of one image that ran, packed without the objects: the very same bytes.
    scored = frames.pack_scored(2**40 + 5, score, 3, 1.25, 3.5)
    assert scored == frames.pack_result(2**40 + 5, [frames.Outcome(frames.OK, score, 3, 1.25, 3.5)])
    assert frames.unpack_result(scored) == (2**40 + 5, [frames.Outcome(frames.OK, score, 3, 1.25, 3.5)])


def test_a_part_frame_is_relayed_under_the_askers_id_with_its_payload_untouched() -> None:
    payload = json.dumps([[1.5, "é"]]).encode()
    frame = frames.pack_part(7, True, payload)
    assert frames.kind(frame) == frames.PART and frame[0] != ord("{")
    assert frames.unpack_part(frame) == (7, True, payload)
    assert frames.unpack_part(frames.readdress_part(frame, 2**40)) == (2**40, True, payload)
    assert frames.unpack_part(frames.pack_part(3, False, b"")) == (3, False, b"")
    with pytest.raises(frames.UNREADABLE):
        frames.unpack_part(frame[:5])


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
    # A result counts its images in 16 bits: a submit of more is refused as unreadable, not
    # answered with a result frame that cannot be packed.
    assert len(frames.unpack_submit(frames.pack_submit(1, 1, 1, 0.0, [0] * frames.MAX_IMAGES)).slots) == 0xFFFF
    with pytest.raises(frames.UNREADABLE):
        frames.unpack_submit(frames.pack_submit(1, 1, 1, 0.0, [0] * (frames.MAX_IMAGES + 1)))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_slab_is_sealed_at_its_size_and_attach_refuses_one_that_is_not() -> None:
    """The engine process maps a front end's slab: a file shrunk under that mapping would be
    SIGBUS at the engine process's next touch past its end, killing it. A slab cannot be
    resized once made, and attach maps only a descriptor so sealed, of exactly its layout's
    size; a refused descriptor is closed, not left open in the engine process."""
    slab = Slab.create(8, 2, "test-sealed")
    try:
        assert fcntl.fcntl(slab.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        for size in (0, slab.layout.total_bytes + PAGE):
            with pytest.raises(PermissionError):
                os.ftruncate(slab.fd, size)
    finally:
        slab.close()

    total = SlabLayout(8, 2).total_bytes

    def memfd(size: int, seals: int = 0, sealable: bool = True) -> int:
        fd = os.memfd_create("test-attach", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd

    before = open_fds()
    pipe_r, pipe_w = os.pipe()
    os.close(pipe_w)
    refused = [(memfd(total, sealable=False), 8, 2),  # no seals possible
               (memfd(total), 8, 2),  # sealable, not sealed
               (memfd(total, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL), 8, 2),  # could still shrink
               (memfd(total - PAGE, SEALS), 8, 2), (memfd(total + PAGE, SEALS), 8, 2),  # not the layout's size
               (memfd(0, SEALS), 0, 1),  # an empty layout: nothing to map
               (pipe_r, 8, 2)]  # not a memfd at all
    for fd, size, slots in refused:
        with pytest.raises((ValueError, OSError)):
            Slab.attach(fd, size, slots, "peer")
    assert open_fds() == before  # each refused descriptor was closed
    good = Slab.attach(memfd(total, SEALS), 8, 2, "peer")
    good.close()


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def test_descriptors_no_message_announced_are_closed() -> None:
    """A peer's bug (descriptors sent with messages that announce none) must not pile them up
    for the channel's life: with no message half-read they belong to none, and are closed."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        peer, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        received: list[tuple[Any, list[int]]] = []
        done = asyncio.Event()

        def on_messages(batch: list[tuple[Any, list[int]]]) -> None:
            received.extend(batch)
            if any(isinstance(m, dict) and m["op"] == "done" for m, _ in batch):
                done.set()
        channel = Channel(sock, loop, on_messages, lambda: None, name="test")
        channel.start()
        before = open_fds()
        for i in range(10):
            fds = [os.memfd_create("test-stray") for _ in range(3)]
            await asyncio.to_thread(socket.send_fds, peer, [raw_frame(json.dumps({"op": "n", "i": i}).encode())], fds)
            for fd in fds:
                os.close(fd)
        await asyncio.to_thread(peer.sendall, raw_frame(b'{"op":"done"}'))
        await asyncio.wait_for(done.wait(), 10)
        assert [m["op"] for m, _ in received] == ["n"] * 10 + ["done"] and not any(f for _, f in received)
        assert open_fds() == before and not channel.closed
        channel.close()
        peer.close()

    asyncio.run(main())


def test_a_malformed_descriptor_count_ends_the_channel() -> None:
    """``_fds`` that is not a small count (null, a list, 1e400, text, out of range), or more
    descriptors than one message may carry waiting for a half-read one: a corrupt stream, which
    ends that channel, and nothing raised past the reader into the event loop."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        escaped: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: escaped.append(context))

        async def ends(send: Any) -> bool:
            peer, sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            closed = asyncio.Event()
            channel = Channel(sock, loop, lambda batch: None, closed.set, name="test")
            channel.start()
            await asyncio.to_thread(send, peer)
            try:
                await asyncio.wait_for(closed.wait(), 2)
            except TimeoutError:
                channel.close()
                return False
            finally:
                peer.close()
            return True

        for bad in ("null", "[1]", "1e400", '"1"', "-1", "true", "17"):
            body = b'{"op":"slab","_fds":' + bad.encode() + b"}"
            assert await ends(lambda peer, body=body: peer.sendall(raw_frame(body))), bad

        def too_many_waiting(peer: socket.socket) -> None:
            for part in (b"\x00\x00", b"\x00"):  # a header not yet whole, 10 descriptors with each part
                fds = [os.memfd_create("test-waiting") for _ in range(10)]
                socket.send_fds(peer, [part], fds)
                for fd in fds:
                    os.close(fd)
        before = open_fds()
        assert await ends(too_many_waiting)
        assert open_fds() == before
        assert not escaped, escaped

    asyncio.run(main())


def test_accept_forever_raises_what_would_fail_on_every_try() -> None:
    """EMFILE and the like pass (tests/integration/test_engine_link_faults.py); a socket that
    is no listener fails on every try: raised at once, for the engine process to end."""
    async def main(path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))  # never listening: accept(2) answers EINVAL
        sock.setblocking(False)
        with pytest.raises(OSError) as raised:
            await asyncio.wait_for(accept_forever(sock, lambda conn: None), 5)
        assert raised.value.errno == errno.EINVAL
        sock.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp) / "s.sock"))


def test_backoff_doubles_up_to_its_ceiling_and_starts_over_on_reset() -> None:
    retry = Backoff(0.05, 0.3)
    assert [retry.next() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    retry.reset()
    assert retry.next() == 0.05
