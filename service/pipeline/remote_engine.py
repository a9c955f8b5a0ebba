"""What the registry's engine factory returns in a front end of a multi-process server: an
engine that runs in the engine process, through the front end's
:class:`~service.pipeline.engine_client.EngineClient` (which creates it on ``acquire``).

The registry warms every version through its ``run``, so each front end checks the whole
path (slab, link, engine process, engine) once per version, as a local engine's warm-up does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.manifest import Manifest
from service.pipeline.holds import Hold


class Client(Protocol):
    """What a remote engine needs of the :class:`~service.pipeline.engine_client.EngineClient`
    (a protocol, not an import: the client module imports this one)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def run(self, category: str, hold: Hold,
            images: np.ndarray) -> Coroutine[Any, Any, tuple[np.ndarray, np.ndarray]]: ...

    def release(self, hold: Hold) -> None: ...


class RemoteEngine:
    """An engine that runs in the engine process (the :class:`~service.engines.base.Engine` protocol)."""

    def __init__(self, client: Client, version_dir: Path, manifest: Manifest, name: str,
                 max_batch_size: int, hold: Hold) -> None:
        self.client = client
        self.version_dir = version_dir
        self.hold = hold  # which content of the folder the engine process runs for it
        self.manifest = manifest
        self.name = name
        self.max_batch_size = max_batch_size

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blocking; from a worker thread only (never from the event loop it would wait on)."""
        future: concurrent.futures.Future[tuple[np.ndarray, np.ndarray]] = asyncio.run_coroutine_threadsafe(
            self.client.run(self.manifest.category, self.hold, images), self.client.loop)
        return future.result()

    def close(self) -> None:
        """The registry gave up on this version (its warm-up failed): let the engine process
        unload it. Called from the registry's worker thread: the client lives on its loop."""
        self.client.loop.call_soon_threadsafe(self.client.release, self.hold)
