"""The engine process around the :class:`~service.engine_core.core.EngineCore` (started by
:mod:`service.supervisor`): settings, logging, signals, its event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any

from service.allocator import keep_freed_memory
from service.config import Settings
from service.engine_core.core import EngineCore
from service.heap import freeze_startup_objects
from service.ipc.heartbeat import beat_forever

log = logging.getLogger(__name__)


def run_engine_process(overrides: dict[str, Any], socket_path: str, beat: socket.socket | None = None) -> None:
    """Entry point of the engine process (started by :mod:`service.supervisor`; ``beat``: where
    its loop says it runs, for the supervisor's watch)."""
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s engine %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the supervisor stops the front ends first and
    # then this process (SIGTERM), so that their requests in flight still get engine time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory(settings.heap_retain_mb << 20)
    freeze_startup_objects()

    async def main() -> None:
        core = EngineCore(settings)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, core.stop)
        started = time.monotonic()
        beating = loop.create_task(beat_forever(beat), name="heartbeat") if beat is not None else None
        try:
            await core.serve(Path(socket_path))
        finally:
            if beating is not None:
                beating.cancel()
        log.info("engine process stopped after %.0f s", time.monotonic() - started)

    try:
        import uvloop  # the front ends' loop too (uvicorn picks it up)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except ImportError:
        asyncio.run(main())
