"""A message channel over a Unix socket: small JSON messages, packed frames, and file
descriptors with them.

Frames are a 4-byte big-endian length and a body: a JSON object (control messages), or a
packed frame whose first byte is its kind (:mod:`service.ipc.frames`: the per-image
``submit`` and ``result``), handed over as ``bytes``. A message sent with descriptors
(a slab's memfd) carries them as ``SCM_RIGHTS`` in the ``sendmsg`` of its first byte; the
reader hands them to the message that announced them (``"_fds": n``), and the receiver owns
them from there (it closes what it does not keep). Descriptors no message announced are
closed once no message is left half-read (they can belong to none), and more than
``_MAX_FDS`` waiting, or an announcement that is not a small count, is a corrupt stream: the
channel ends. A peer's bug must not pile descriptors up in this process.

Everything runs on the event loop, with no thread: the socket is non-blocking, the loop
calls back when it is readable (``recvmsg``, which asyncio's transports do not offer, is
called right there) or writable again. A send never blocks: what the kernel does not take
at once waits in the channel's outbox, so a peer that stopped reading (a front end under
SIGSTOP) costs its own outbox, never the engine process's loop. What one turn of the loop
sends leaves in one write at the next turn (a batch's answers to a front end: one syscall,
one wake-up of the peer, however many requests the batch held). Incoming messages are
handed over in bulk, one callback per read however many it held: at several thousand
images a second, per-message thread hand-offs would cost more than the messages.

Peers are processes of the same server, behind a socket in a directory only the server's
user can open; messages are data (JSON), never code (no pickle).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, Any]
Incoming = Message | bytes  # a JSON message, or a packed frame
_HEADER = 4
_JSON = ord("{")
_MAX_MESSAGE = 16 * 1024 * 1024  # far above any real message: a corrupt length ends the channel
_MAX_FDS = 16
_READ_BYTES = 1 << 16
# Made once: ``json.dumps`` with separators builds an encoder per call, and ``json.loads`` of
# bytes detects their encoding first; both cost more than the small message itself.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode
_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * 4)


class Channel:
    """One end of a connection. ``on_messages(batch)`` gets a list of ``(message, fds)``
    (``message``: a dict, or the bytes of a packed frame);
    ``on_close()`` runs once, when either side ends it. Both run on ``loop``."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_messages: Callable[[list[tuple[Incoming, list[int]]]], None],
                 on_close: Callable[[], None], name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._loop = loop
        self._on_messages = on_messages
        self._on_close = on_close
        self._inbox = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        # Outgoing frames not yet taken by the kernel: [data, fds not yet sent].
        self._outbox: collections.deque[list[Any]] = collections.deque()
        self._writing = False
        self._flush_pending = False
        self._closed = False

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send ``message`` (never blocks). Dropped once the channel is closed: the peer is
        gone, and ``on_close`` tells the owner so."""
        if self._closed:
            return
        if fds:
            message = {**message, "_fds": len(fds)}
        self._queue(_encode(message).encode(), list(fds))

    def send_frame(self, frame: bytes) -> None:
        """Send a packed frame (:mod:`service.ipc.frames`); like :meth:`send`."""
        if not self._closed:
            self._queue(frame, [])

    def _queue(self, body: bytes, fds: list[int]) -> None:
        self._outbox.append([len(body).to_bytes(_HEADER, "big") + body, fds])
        if not self._writing and not self._flush_pending:
            # Sent at the loop's next turn, with whatever else this turn sends: the answers of a
            # batch to one front end go in one syscall and wake it once.
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def close(self) -> None:
        """End the channel; what was sent before is handed to the kernel first (as far as it
        takes it without blocking)."""
        if not self._closed and self._outbox and not self._writing:
            self._flush()
        self._finish()

    # ------------------------------------------------------------------ loop callbacks
    def _flush_now(self) -> None:
        self._flush_pending = False
        if not self._closed and not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._outbox:
                head = self._outbox[0]
                if head[1]:
                    sent = socket.send_fds(self.sock, [head[0]], head[1])
                    head[1] = []  # the descriptors went with the first byte
                    if sent < len(head[0]):
                        head[0] = head[0][sent:]
                        break
                    self._outbox.popleft()
                    continue
                # Plain frames, up to the next one with descriptors: one syscall for the burst.
                chunk = []
                for entry in self._outbox:
                    if entry[1]:
                        break
                    chunk.append(entry[0])
                data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
                sent = self.sock.send(data)
                for _ in chunk:
                    self._outbox.popleft()
                if sent < len(data):
                    self._outbox.appendleft([data[sent:], []])
                    break
        except BlockingIOError:
            pass
        except OSError as exc:
            log.info("%s: send failed: %s", self.name, exc)
            self._finish()
            return
        if self._outbox and not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._writable)
        elif not self._outbox and self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _writable(self) -> None:
        if not self._closed:
            self._flush()

    def _readable(self) -> None:
        batch: list[tuple[Incoming, list[int]]] = []
        try:
            while True:
                try:
                    # recvmsg itself, not socket.recv_fds: that wrapper builds an array per
                    # call, and descriptors come with a slab only, a few times per process.
                    data, ancillary, _flags, _addr = self.sock.recvmsg(_READ_BYTES, _ANCILLARY)
                except BlockingIOError:
                    break
                if not data:
                    self._deliver(batch)
                    self._finish()
                    return
                if ancillary:
                    self._fds.extend(_descriptors(ancillary))
                self._inbox += data
                self._split(batch)  # into batch: what it parsed before a corrupt frame is delivered too
                self._drop_unannounced()
                if len(data) < _READ_BYTES:
                    break
        except (OSError, ValueError) as exc:
            log.info("%s: read failed: %s", self.name, exc)
            self._deliver(batch)
            self._finish()
            return
        self._deliver(batch)

    def _deliver(self, batch: list[tuple[Incoming, list[int]]]) -> None:
        if batch:
            self._on_messages(batch)

    def _split(self, out: list[tuple[Incoming, list[int]]]) -> None:
        buffer = self._inbox
        at, end = 0, len(buffer)
        try:
            while end - at >= _HEADER:
                size = int.from_bytes(buffer[at:at + _HEADER], "big")
                if size > _MAX_MESSAGE or size == 0:
                    raise ValueError(f"message of {size} bytes announced: corrupt stream")
                if end - at < _HEADER + size:
                    break
                body = bytes(buffer[at + _HEADER:at + _HEADER + size])
                at += _HEADER + size
                if body[0] != _JSON:
                    out.append((body, []))
                    continue
                message = _decode(body.decode())
                wanted = message.pop("_fds", 0)
                # Exactly a small int (bool is one too, and null, a list or 1e400 are not):
                # anything else is a corrupt stream, ended here rather than raising past the reader.
                if type(wanted) is not int or not 0 <= wanted <= _MAX_FDS:
                    raise ValueError(f"message announced {wanted!r} descriptors: corrupt stream")
                if wanted > len(self._fds):
                    raise ValueError(f"message announced {wanted} descriptors, {len(self._fds)} arrived")
                out.append((message, [self._fds.popleft() for _ in range(wanted)]))
        finally:
            del buffer[:at]  # once per read, not once per message

    def _drop_unannounced(self) -> None:
        """Descriptors arrive with the first byte of the message announcing them: with no
        message half-read, any left over were announced by none, and are closed. Waiting for a
        half-read message, more than one message's worth is a corrupt stream."""
        if not self._fds:
            return
        if self._inbox:
            if len(self._fds) > _MAX_FDS:
                raise ValueError(f"{len(self._fds)} descriptors waiting for one message: corrupt stream")
            return
        log.warning("%s: closing %d descriptors no message announced", self.name, len(self._fds))
        _close_all(self._fds)
        self._fds.clear()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        except (ValueError, RuntimeError):  # the loop is closing
            pass
        self._outbox.clear()
        _close_all(self._fds)  # descriptors nobody claimed
        self._fds.clear()
        self.sock.close()
        self._on_close()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4]))
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
