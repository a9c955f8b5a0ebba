"""A child process's event loop saying it runs: a byte a second to the supervisor, which kills
and replaces a child silent for too long (:mod:`service.supervisor`). From the loop itself,
since a loop that stops (SIGSTOP, a call that never returns) is what leaves a front end's
connections, or every front end's batches, waiting."""

from __future__ import annotations

import asyncio
import socket

BEAT_S = 1.0  # how often a child's loop says it runs


async def beat_forever(sock: socket.socket) -> None:
    """A byte every BEAT_S on ``sock`` for as long as this loop runs. A full buffer (the
    supervisor itself stopped) drops a byte: one read says the loop ran."""
    sock.setblocking(False)
    while True:
        try:
            sock.send(b".")
        except BlockingIOError:
            pass
        except OSError:  # the supervisor is gone: PR_SET_PDEATHSIG stops this process
            return
        await asyncio.sleep(BEAT_S)
