"""A pinned version whose folder leaves the store (a cleanup script) while a pin holds it.

One process serves it on from memory; a pin followed from elsewhere (multi-process: another
front end's reload, a retry once the engine process is back) is served where the engine
factory still has the version without its folder, and otherwise fails the category: never
another version while the pin holds.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness import fake_version
from models.manifest import ManifestError
from service.config import Settings
from service.engines.base import Engine
from service.engines.factory import load_engine
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import ModelNotLoaded, PinnedVersionRemoved, VersionNotFound


def _registry(store: Path, factory: Any = load_engine) -> ModelRegistry:
    return ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1), engine_factory=factory)


def _serves(registry: ModelRegistry) -> tuple[str, bool]:
    model = registry.get("aaa")
    return model.version, model.pinned


def test_one_process_serves_a_pinned_version_on_from_memory_after_its_folder_left_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, "aaa", "1")
    fake_version(store, "aaa", "2")
    registry = _registry(store)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        await registry.reload("aaa", "1")
        shutil.rmtree(store / "aaa" / "1")
        await registry.refresh()  # the store watch
        assert _serves(registry) == ("1", True)
        with pytest.raises(VersionNotFound):  # an operator's new reload of it is refused; it serves on
            await registry.reload("aaa", "1")
        assert _serves(registry) == ("1", True)
        await registry.reload("aaa")  # unpinned: the newest
        assert _serves(registry) == ("2", False)

    asyncio.run(main())


def test_a_lost_pinned_version_fails_its_category_instead_of_the_newest_until_an_operator_reloads(
        tmp_path: Path) -> None:
    """What a front end does when its engine process restarted and cannot load the pinned
    version again (``lost``): before, the retry on reconnecting (``reload(category)``) and the
    store watch loaded version 2, unpinned, while the server's pin said 1."""
    store = tmp_path / "store"
    fake_version(store, "aaa", "1")
    fake_version(store, "aaa", "2")
    registry = _registry(store)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        pinned = await registry.reload("aaa", "1")
        shutil.rmtree(store / "aaa" / "1")
        registry.lost("aaa", str(pinned.version_dir), RuntimeError("engine process: cannot load it"))
        await registry.refresh()
        assert "aaa" not in registry.serving()
        with pytest.raises(PinnedVersionRemoved, match="pinned version 1 was removed"):
            await registry.retry("aaa")
        with pytest.raises(ModelNotLoaded, match="pinned version 1 was removed"):
            registry.get("aaa")
        assert str(store) not in registry.failed["aaa"]
        await registry.refresh()
        assert "aaa" not in registry.serving()
        await registry.reload("aaa")  # the operator unpins
        assert _serves(registry) == ("2", False) and registry.failed == {}
        fake_version(store, "aaa", "3")
        assert await registry.refresh() == ["aaa"]  # unpinned: the watch moves it on again
        assert _serves(registry) == ("3", False)

    asyncio.run(main())


def test_a_pin_in_force_is_served_from_an_engine_held_without_its_folder_and_checked_on_its_manifest(
        tmp_path: Path) -> None:
    """The engine process's case: the factory has the version in memory (its manifest with it)."""
    store = tmp_path / "store"
    held: dict[Path, Engine] = {}
    for version in ("1", "2"):
        folder = fake_version(store, "aaa", version)
        held[folder] = load_engine(folder, kind="null")

    def from_memory(version_dir: Path, **_: Any) -> Engine:
        return held[version_dir]

    async def main() -> None:
        registry = _registry(store, from_memory)
        registry.discover()
        shutil.rmtree(store / "aaa" / "1")
        with pytest.raises(VersionNotFound):  # not a pin in force: an operator's new choice
            await registry.reload("aaa", "1")
        assert _serves_or_none(registry) is None
        await registry.reload("aaa", "1", in_force=True)
        assert _serves(registry) == ("1", True)
        await registry.load_all()
        await registry.refresh()
        assert _serves(registry) == ("1", True)
        # An engine that is not the version asked for is refused, as a misplaced folder is.
        held[store / "aaa" / "1"] = held[store / "aaa" / "2"]
        with pytest.raises(ManifestError, match="holds the manifest of aaa/2"):
            await registry.reload("aaa", "1", in_force=True)
        assert _serves(registry) == ("1", True)

    asyncio.run(main())


def _serves_or_none(registry: ModelRegistry) -> tuple[str, bool] | None:
    return _serves(registry) if "aaa" in registry.serving() else None
