"""A category removed from the store while it serves."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from harness import CATEGORY, fake_version
from service.config import Settings
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import RegistryError, UnknownCategory


def test_reloading_a_category_removed_from_the_store_says_so(tmp_path: Path) -> None:
    """It answered 404 "unknown category 'tile'; known: brick, tile" while it served on."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    fake_version(store, "tile", "1")
    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1))

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        shutil.rmtree(store / "tile")
        await registry.refresh()
        assert registry.serving() == {CATEGORY: "1", "tile": "1"}  # in memory: serves on
        with pytest.raises(RegistryError, match="tile is no longer in the model store; version 1 serves on"):
            await registry.reload("tile")
        with pytest.raises(UnknownCategory):
            await registry.reload("gravel")

    asyncio.run(main())
