"""The store watch lists the model store in a thread, not on the event loop. A store on a network
file system (NFS, EFS) answers each listing and ``stat`` over the network: the scan, every
``store_poll_s``, held the event loop for all of it, and every request in flight waited."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from harness import CATEGORY, fake_version
from models.manifest import list_versions
from service.config import Settings
from service.pipeline import store_watch
from service.pipeline.registry import ModelRegistry

SLOW_S = 0.3  # one category's listing on a slow network file system


def test_a_slow_store_listing_does_not_hold_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")

    async def main() -> list[float]:
        registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1))
        registry.discover()
        await registry.load_all()
        fake_version(store, CATEGORY, "2")

        def slow_listing(folder: Path) -> Any:
            time.sleep(SLOW_S)  # the network's round trips, in the scan's own thread
            return list_versions(folder)
        monkeypatch.setattr(store_watch, "list_versions", slow_listing)

        gaps: list[float] = []
        stop = asyncio.Event()

        async def tick() -> None:  # what a request in flight needs: the loop turning
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)  # the ticker is turning before the scan starts
        try:
            assert await registry.refresh() == [CATEGORY]  # the scan still sees version 2
        finally:
            stop.set()
            await ticker
        assert registry.get(CATEGORY).version == "2"
        return gaps

    gaps = asyncio.run(main())
    assert gaps and max(gaps) < SLOW_S / 2, f"the event loop stood still for {max(gaps):.3f} s during the scan"
