"""Helpers of the multi-process tests. In-process (``test_multiprocess_engine_core``,
``test_multiprocess_slots``, ``test_multiprocess_version_holds``, ``test_multiprocess_reloads``,
``test_multiprocess_pin_faults``): an engine core serving on a socket of its own, front ends'
runtimes that relay and follow reloads as a server's do, and a front end's whole state
(:class:`RecordedState`), all on the test's event loop, an engine that scores a fixed value and
can be held or made to fail (:class:`ValueEngine`), and a front end's channel as the engine
process sees it (:class:`RecordedChannel`, for the submit tests of
``test_multiprocess_engine_core`` and ``test_engine_submit_slabs``). Over real HTTP
(``test_multiprocess_server``, ``test_multiprocess_limits``): the settings of a two-front-end
server (:data:`MP`), its store with a second version, and requests spread over the front ends
(:func:`post_many`). Test modules import this, never each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness import CATEGORY, copy_version, part
from models.manifest import Manifest
from service.config import Settings
from service.engine_core import EngineCore
from service.pipeline.engine_client import EngineClient
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.runtime import PipelineRuntime
from service.pipeline.state import ServiceState


@contextlib.asynccontextmanager
async def engine_process(store: Path, factory: Any = None, **overrides: Any) -> AsyncIterator[tuple[EngineCore, Settings]]:
    """An engine core serving on a socket of its own, on this loop, with the settings a front
    end connects with (small queues, a short batching window); stopped afterwards."""
    base: dict[str, Any] = {**dict(model_store=store, engine="null", max_batch_size=4, max_queue_delay_ms=1,
                                   max_queue_size=4, store_poll_s=0), **overrides}
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "engine.sock"
        core = EngineCore(Settings(**base), **({"engine_factory": factory} if factory else {}))
        serving = asyncio.create_task(core.serve(sock))
        try:
            yield core, Settings(**base, engine_socket=sock)
        finally:
            core.stop()
            await serving


@contextlib.asynccontextmanager
async def front_end(settings: Settings) -> AsyncIterator[tuple[PipelineRuntime, EngineClient]]:
    """A front end's runtime that reloads like a server's: its own reloads relayed, the
    others' followed; closed afterwards."""
    link = EngineClient(settings, settings.engine_socket)
    rt = PipelineRuntime(settings, None, engine_link=link)

    async def follow(category: str, version: str | None) -> None:
        await rt.registry.reload(category, version, in_force=True)
    link.on_reload = follow
    rt.open()
    try:
        await link.start_serving(rt.registry.load_all)  # as ServiceState.start
        yield rt, link
    finally:
        await rt.close()


async def operator_reload(rt: PipelineRuntime, link: EngineClient, category: str, version: str | None) -> None:
    """What ``POST /v1/models/{category}/reload`` does on a front end (ServiceState.reload)."""
    await rt.registry.reload(category, version)
    link.broadcast_reload(category, version)


@contextlib.asynccontextmanager
async def pinned_to_version_1(
        store: Path, unload_grace_s: float | None = None,
) -> AsyncIterator[tuple[EngineCore, Settings, PipelineRuntime, EngineClient]]:
    """An engine process (letting go of an unused version after ``unload_grace_s``, where
    given) and a first front end on which an operator pinned ``aaa`` to version 1: the core,
    the settings, the front end's runtime and its link."""
    async with engine_process(store) as (core, settings):
        if unload_grace_s is not None:
            core.unload_grace_s = unload_grace_s
        async with front_end(settings) as (first, first_link):
            await operator_reload(first, first_link, "aaa", "1")
            yield core, settings, first, first_link


class RecordedState(ServiceState):
    """A front end's whole state (what ``msflow serve`` runs in each front end), recording
    every version it swapped in."""

    def __init__(self, settings: Settings) -> None:
        self.swapped_in: list[str] = []
        super().__init__(settings)

    def _swapped(self, model: LoadedModel) -> None:
        self.swapped_in.append(model.version)
        super()._swapped(model)


@contextlib.asynccontextmanager
async def started_state(settings: Settings) -> AsyncIterator[RecordedState]:
    """A replacement front end's state, started (``ServiceState.start`` returned: uvicorn
    would listen now) and stopped afterwards."""
    state = RecordedState(settings)
    await state.start()
    try:
        yield state
    finally:
        await state.stop()


class RecordedChannel:
    """A front end's channel as the engine process sees it, keeping what it is sent."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.arrived = asyncio.Event()

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.arrived.set()

    def send(self, message: dict[str, object]) -> None:
        raise AssertionError(f"a submit must be answered by a packed result, not {message}")


class ValueEngine:
    """Scores every image ``value`` and fills its map with it. Once warm (the engine
    process's own first batch), a ``gated`` one holds each batch at ``gate`` (a busy
    accelerator) and a ``failing`` one raises."""

    def __init__(self, version_dir: Path, value: float, gated: bool = False, failing: bool = False) -> None:
        self.manifest = Manifest.read(version_dir)
        self.name = f"value-{value}"
        self.max_batch_size = 4
        self.value, self.failing = value, failing
        self.started, self.gate = threading.Event(), threading.Event()
        if not gated:
            self.gate.set()
        self._warm = False

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._warm:
            self.started.set()
            assert self.gate.wait(10), "test gate never opened"
            if self.failing:
                raise RuntimeError("engine exploded")
        self._warm = True
        n, size = len(images), self.manifest.input_size
        return np.full(n, self.value, np.float32), np.full((n, size, size), self.value, np.float32)


MP = dict(api_processes=2, engine="onnx", store_poll_s=0.5)


def store_with_version_2(model_store: Path, root: Path) -> Path:
    """A copy of ``model_store`` under ``root`` whose category has a version 2 as well."""
    store = root / "store"
    shutil.copytree(model_store, store)
    copy_version(store / CATEGORY / "1", store / CATEGORY / "2", CATEGORY, "2")
    return store


def post_many(url: str, paths: list[Path], count: int, **params: str) -> list[httpx.Response]:
    """``count`` requests at once, each on its own connection (so they spread over front ends)."""
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/inspect/{CATEGORY}", files=[part(paths[i % len(paths)])],
                          params={"heatmap": "none", **params}, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))
