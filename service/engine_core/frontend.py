"""The engine process's view of one connected front end: its channel, its slabs, its requests."""

from __future__ import annotations

import asyncio
from typing import Any

from service.ipc.channel import Channel
from service.ipc.slab import Slab
from service.pipeline.batcher import Batcher


class FrontEnd:
    """One connected front end (``ident``: this process's number for the connection)."""

    def __init__(self, ident: int, channel: Channel) -> None:
        self.ident = ident
        self.channel = channel
        self.pid = 0
        self.connected = True  # False once its channel ended: what finishes for it after is not its
        self.slabs: dict[int, Slab] = {}
        self.requests: dict[int, tuple[Batcher, list[asyncio.Future[Any]]]] = {}
