"""The one port of a multi-process server: a socket per front end on it (``SO_REUSEPORT``)."""

from __future__ import annotations

import socket


def reuseport_socket(host: str, port: int, exclusive: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening yet (asyncio's
    ``create_server`` calls ``listen`` when uvicorn starts serving on it). Port 0 picks a free
    port; bind the next ones to the port it got.

    ``exclusive``: first make sure nothing serves the port. ``SO_REUSEPORT`` lets any process
    of the same user bind it too, so a second ``msflow serve`` on the port of one still running
    (an old deployment that survived its stop) started without an error, and the kernel split
    the connections between the two servers and their model versions. A socket without the
    option cannot bind beside a listening one that has it: that bind is the check."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if exclusive and port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no server
            probe.bind((host, port))  # OSError EADDRINUSE while anything listens there
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
