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

from harness import fake_version, serves
from models.manifest import ManifestError
from service.config import Settings
from service.engines.base import Engine
from service.engines.factory import load_engine
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import ModelNotLoaded, PinnedVersionRemoved, VersionNotFound


def _registry(store: Path, factory: Any = load_engine) -> ModelRegistry:
    return ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1), engine_factory=factory)


async def _pinned_to_1_then_removed(store: Path) -> tuple[ModelRegistry, Path]:
    """One process's registry serving the store, after an operator pinned ``aaa`` to version 1
    and a cleanup script removed that version's folder: the registry and the folder it had."""
    registry = _registry(store)
    registry.discover()
    await registry.load_all()
    pinned = await registry.reload("aaa", "1")
    shutil.rmtree(store / "aaa" / "1")
    return registry, pinned.version_dir


def test_one_process_serves_a_pinned_version_on_from_memory_after_its_folder_left_the_store(
        two_version_store: Path) -> None:
    async def main() -> None:
        registry, _ = await _pinned_to_1_then_removed(two_version_store)
        await registry.refresh()  # the store watch
        assert serves(registry) == ("1", True)
        with pytest.raises(VersionNotFound):  # an operator's new reload of it is refused; it serves on
            await registry.reload("aaa", "1")
        assert serves(registry) == ("1", True)
        await registry.reload("aaa")  # unpinned: the newest
        assert serves(registry) == ("2", False)

    asyncio.run(main())


def test_a_lost_pinned_version_fails_its_category_instead_of_the_newest_until_an_operator_reloads(
        two_version_store: Path) -> None:
    """What a front end does when its engine process restarted and cannot load the pinned
    version again (``lost``): before, the retry on reconnecting (``reload(category)``) and the
    store watch loaded version 2, unpinned, while the server's pin said 1."""
    store = two_version_store

    async def main() -> None:
        registry, pinned_dir = await _pinned_to_1_then_removed(store)
        registry.lost("aaa", str(pinned_dir), RuntimeError("engine process: cannot load it"))
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
        assert serves(registry) == ("2", False) and registry.failed == {}
        fake_version(store, "aaa", "3")
        assert await registry.refresh() == ["aaa"]  # unpinned: the watch moves it on again
        assert serves(registry) == ("3", False)

    asyncio.run(main())


def test_a_pin_in_force_is_served_from_an_engine_held_without_its_folder_and_checked_on_its_manifest(
        two_version_store: Path) -> None:
    """The engine process's case: the factory has the version in memory (its manifest with it)."""
    store = two_version_store
    held = {folder: load_engine(folder, kind="null") for folder in (store / "aaa" / "1", store / "aaa" / "2")}

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
        assert serves(registry) == ("1", True)
        await registry.load_all()
        await registry.refresh()
        assert serves(registry) == ("1", True)
        # An engine that is not the version asked for is refused, as a misplaced folder is.
        held[store / "aaa" / "1"] = held[store / "aaa" / "2"]
        with pytest.raises(ManifestError, match="holds the manifest of aaa/2"):
            await registry.reload("aaa", "1", in_force=True)
        assert serves(registry) == ("1", True)

    asyncio.run(main())


def _serves_or_none(registry: ModelRegistry) -> tuple[str, bool] | None:
    return serves(registry) if "aaa" in registry.serving() else None


def test_a_pin_ended_by_another_front_ends_retirement_is_not_shown_as_pinned(two_version_store: Path) -> None:
    """Multi-process: another front end retired the category and its pin with it (``end_pin``).
    The model still serving here was loaded pinned; ``/v1/models`` said ``pinned: true`` of it
    until the watch next swapped it, while the server held no pin any more."""
    async def main() -> None:
        registry = _registry(two_version_store)
        registry.discover()
        await registry.load_all()
        await registry.reload("aaa", "1")
        assert registry.describe("aaa").pinned
        assert await registry.end_pin("aaa")
        assert registry.describe("aaa").pinned is False
        assert serves(registry) == ("1", False)
        await registry.refresh()  # unpinned now: the watch serves the newest
        assert serves(registry) == ("2", False)

    asyncio.run(main())
