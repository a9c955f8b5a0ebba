"""The engine process's Unix socket: where front ends connect, and the loop accepting them.

Accepting can fail for a moment with nothing wrong in this process's code: out of
descriptors (``EMFILE``/``ENFILE``), or of kernel memory (``ENOMEM``/``ENOBUFS``). The loop
must outlive such a moment. Were it to end, the process would live on, batches and all, and
no front end started or restarted later could ever connect to it, with nothing in the log.
Meanwhile a connecting front end waits in the listen backlog and is accepted when the moment
passes. Any other error (a socket that is no listener any more: ``EBADF``, ``EINVAL``) would
fail the same way on every try: it ends :func:`accept_forever`, for its caller to end the
process (the supervisor starts a new one).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from service.ipc.retry import Backoff

log = logging.getLogger(__name__)

# What accept(2) fails with for a moment, the listener still sound (see the module docstring);
# ECONNABORTED, EPROTO: a peer that gave up before it was accepted; EPERM: a security module.
PASSING = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.ECONNABORTED, errno.EPROTO,
                     errno.EPERM, errno.EINTR, errno.EAGAIN})


def listen_unix(path: Path, backlog: int = 64) -> socket.socket:
    """A non-blocking socket listening on ``path`` (replacing a stale one), for this user only."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


async def accept_forever(listener: socket.socket, on_connection: Callable[[socket.socket], None]) -> None:
    """Hand each connection to ``on_connection``; returns never. An error of accept that
    passes (:data:`PASSING`) is logged and tried again after a pause that grows while the
    failures go on; any other is raised."""
    loop = asyncio.get_running_loop()
    retry = Backoff(0.05, 2.0)
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError as exc:
            if exc.errno not in PASSING:
                raise
            pause = retry.next()
            log.error("accepting a connection on %s failed (%s); retrying in %.2f s",
                      listener.getsockname(), exc, pause)
            await asyncio.sleep(pause)
            continue
        retry.reset()
        on_connection(conn)
