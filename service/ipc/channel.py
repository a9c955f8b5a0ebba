"""A message channel over a Unix socket: small JSON messages, and file descriptors with them.

Frames are a 4-byte big-endian length and a JSON object. A message sent with descriptors
(a slab's memfd) carries them as ``SCM_RIGHTS`` in the same ``sendmsg``; the reader hands
them to the message that announced them (``"_fds": n``).

Why a reader thread and a writer thread per channel rather than asyncio transports: asyncio
has no ``recvmsg`` for descriptors, and the engine process must never block its event loop
on a peer that stopped reading (a front end under SIGSTOP, a full socket buffer). So the
loop only queues outgoing messages, and incoming ones arrive on the loop in bulk, one
``call_soon_threadsafe`` per read, however many messages it held.

Peers are processes of the same server, behind a socket in a directory only the server's
user can open; messages are data (JSON), never code (no pickle).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, Any]
_HEADER = 4
_MAX_MESSAGE = 16 * 1024 * 1024  # far above any real message: a corrupt length ends the channel
_MAX_FDS = 16


class Channel:
    """One end of a connection. ``on_messages(batch)`` runs on ``loop`` with a list of
    ``(message, fds)``; ``on_close()`` runs on ``loop`` once, when either side ends it."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_messages: Callable[[list[tuple[Message, list[int]]]], None],
                 on_close: Callable[[], None], name: str) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.name = name
        self._loop = loop
        self._on_messages = on_messages
        self._on_close = on_close
        self._outbox: queue.SimpleQueue[tuple[bytes, Sequence[int]] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._close_reported = False
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-read", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name=f"{name}-write", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Queue ``message`` (never blocks). Silently dropped once the channel is closed: the
        peer is gone, and ``on_close`` tells the owner so."""
        if self._closed.is_set():
            return
        if fds:
            message = {**message, "_fds": len(fds)}
        body = json.dumps(message, separators=(",", ":")).encode()
        self._outbox.put((len(body).to_bytes(_HEADER, "big") + body, fds))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._outbox.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread
        except OSError:
            pass

    # ------------------------------------------------------------------ threads
    def _write_loop(self) -> None:
        try:
            while True:
                entry = self._outbox.get()
                if entry is None:
                    break
                data, fds = entry
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                    continue
                # Coalesce what is already queued into one write (one syscall per burst).
                chunks = [data]
                while len(chunks) < 256:
                    try:
                        nxt = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None or nxt[1]:
                        self._outbox.put(nxt)  # keep its place: handled next round
                        break
                    chunks.append(nxt[0])
                self.sock.sendall(b"".join(chunks))
        except OSError as exc:
            if not self._closed.is_set():
                log.info("%s: send failed: %s", self.name, exc)
        finally:
            self._finish()

    def _read_loop(self) -> None:
        buffer = bytearray()
        fds: deque[int] = deque()
        try:
            while True:
                data, received, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, _MAX_FDS)
                if not data:
                    break
                fds.extend(received)
                buffer += data
                batch = self._split(buffer, fds)
                if batch:
                    self._loop.call_soon_threadsafe(self._on_messages, batch)
        except (OSError, ValueError) as exc:
            if not self._closed.is_set():
                log.info("%s: read failed: %s", self.name, exc)
        except RuntimeError:  # the loop closed under us: the process is ending
            pass
        finally:
            for fd in fds:  # descriptors nobody claimed
                _close_quietly(fd)
            self._finish()

    @staticmethod
    def _split(buffer: bytearray, fds: deque[int]) -> list[tuple[Message, list[int]]]:
        out: list[tuple[Message, list[int]]] = []
        while len(buffer) >= _HEADER:
            size = int.from_bytes(buffer[:_HEADER], "big")
            if size > _MAX_MESSAGE:
                raise ValueError(f"message of {size} bytes announced: corrupt stream")
            if len(buffer) < _HEADER + size:
                break
            message = json.loads(bytes(buffer[_HEADER:_HEADER + size]))
            del buffer[:_HEADER + size]
            wanted = int(message.pop("_fds", 0))
            if wanted > len(fds):
                raise ValueError(f"message announced {wanted} descriptors, {len(fds)} arrived")
            out.append((message, [fds.popleft() for _ in range(wanted)]))
        return out

    def _finish(self) -> None:
        with _FINISH_LOCK:
            first = not self._close_reported
            self._close_reported = True
        self._closed.set()
        self._outbox.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if first:
            try:
                self._loop.call_soon_threadsafe(self._closed_on_loop)
            except RuntimeError:  # loop already closed
                pass

    def _closed_on_loop(self) -> None:
        try:
            self.sock.close()
        finally:
            self._on_close()


_FINISH_LOCK = threading.Lock()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
