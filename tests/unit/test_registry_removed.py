"""What leaves the model store while it serves: the store watch lets go of it once it has been
gone for the grace period (MSFLOW_STORE_REMOVAL_GRACE_S), and never on a blip or a store it
cannot list. Before, a category removed served on from memory until a restart, and a served
version removed was replaced by the next older one at the very next scan (a folder replaced
by ``rsync --delete`` swapped twice: to the older version and back)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from harness import CATEGORY, fake_version
from service.config import Settings
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import RegistryError, UnknownCategory

GRACE_S = 0.2


class Recorded:
    """A registry over ``store`` (the null engine) recording its swaps and retirements."""

    def __init__(self, store: Path, grace_s: float = GRACE_S) -> None:
        self.swaps: list[tuple[str, str]] = []
        self.retired: list[tuple[str, str | None]] = []
        self.registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1,
                                               store_removal_grace_s=grace_s),
                                      on_swap=lambda m: self.swaps.append((m.category, m.version)))
        self.registry.on_retire = self._retired

    def _retired(self, category: str, model: LoadedModel | None) -> None:
        self.retired.append((category, model.version if model is not None else None))

    async def start(self) -> ModelRegistry:
        self.registry.discover()
        await self.registry.load_all()
        return self.registry


def _two_categories(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    fake_version(store, "tile", "1")
    return store


async def _scans_over(registry: ModelRegistry, seconds: float) -> None:
    """The watch's scans for ``seconds`` (a few per grace period)."""
    end = time.monotonic() + seconds
    while True:
        await registry.refresh()
        if time.monotonic() >= end:
            return
        await asyncio.sleep(GRACE_S / 4)


def test_a_category_gone_for_the_grace_period_is_retired_and_comes_back_as_a_new_one(tmp_path: Path) -> None:
    store = _two_categories(tmp_path)
    recorded = Recorded(store)

    async def main() -> None:
        registry = await recorded.start()
        shutil.rmtree(store / "tile")
        await registry.refresh()  # gone on one scan: not yet
        assert registry.serving() == {CATEGORY: "1", "tile": "1"} and recorded.retired == []
        with pytest.raises(RegistryError, match="version 1 serves on until the store watch retires it"):
            await registry.reload("tile")
        await _scans_over(registry, GRACE_S * 1.5)
        assert recorded.retired == [("tile", "1")]
        assert registry.serving() == {CATEGORY: "1"} and registry.categories == [CATEGORY]
        assert registry.status() == {CATEGORY: "serving 1"} and registry.ready
        with pytest.raises(UnknownCategory) as unknown:
            registry.get("tile")
        assert "removed from the model store and stopped serving at 20" in str(unknown.value)
        with pytest.raises(UnknownCategory, match="removed from the model store"):
            await registry.reload("tile")
        with pytest.raises(UnknownCategory) as never_known:
            registry.get("gravel")
        assert never_known.value.removed is None

        fake_version(store, "tile", "2")  # back: loaded by the watch like a new category
        assert await registry.refresh() == ["tile"]
        assert registry.serving() == {CATEGORY: "1", "tile": "2"} and registry.removed_note("tile") is None
        assert recorded.swaps[-1] == ("tile", "2")

    asyncio.run(main())


def test_a_folder_gone_for_a_scan_and_back_is_neither_retired_nor_swapped(tmp_path: Path) -> None:
    """``rsync --delete`` replacing a folder, an NFS blip: gone on a scan, back on the next."""
    store = _two_categories(tmp_path)
    fake_version(store, CATEGORY, "2")
    recorded = Recorded(store)

    async def main() -> None:
        registry = await recorded.start()
        swaps = list(recorded.swaps)
        for _ in range(4):  # each blip shorter than the grace, but together far longer
            shutil.move(store / "tile", tmp_path / "tile-away")
            shutil.move(store / CATEGORY / "2", tmp_path / "2-away")
            await registry.refresh()
            await asyncio.sleep(GRACE_S * 0.6)
            shutil.move(tmp_path / "tile-away", store / "tile")
            shutil.move(tmp_path / "2-away", store / CATEGORY / "2")
            await registry.refresh()
        assert recorded.retired == [] and recorded.swaps == swaps  # before: swapped to 1 and back each time
        assert registry.serving() == {CATEGORY: "2", "tile": "1"}

    asyncio.run(main())


def test_a_store_that_cannot_be_listed_retires_nothing(tmp_path: Path) -> None:
    """A root that cannot be listed (an unmounted volume; here a file in its place) says nothing
    is gone, however long; and the grace starts over once it lists again."""
    store = _two_categories(tmp_path)
    recorded = Recorded(store)

    async def main() -> None:
        registry = await recorded.start()
        shutil.rmtree(store / "tile")
        await registry.refresh()  # tile seen gone once ...
        shutil.move(store, tmp_path / "away")
        store.write_text("not a folder")
        end = time.monotonic() + GRACE_S * 2
        while time.monotonic() < end:  # ... then the store is unreadable for two grace periods
            with pytest.raises(OSError):
                await registry.refresh()
            await asyncio.sleep(GRACE_S / 4)
        store.unlink()
        shutil.move(tmp_path / "away", store)
        await registry.refresh()  # lists again, tile gone: the grace starts here, not before
        assert recorded.retired == [] and registry.serving() == {CATEGORY: "1", "tile": "1"}
        await _scans_over(registry, GRACE_S * 1.5)
        assert recorded.retired == [("tile", "1")]

    asyncio.run(main())


def test_a_served_version_removed_gives_way_to_the_newest_remaining_after_the_grace(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for version in ("1", "2", "3"):
        fake_version(store, CATEGORY, version)
    recorded = Recorded(store)

    async def main() -> None:
        registry = await recorded.start()
        assert registry.serving() == {CATEGORY: "3"}
        shutil.rmtree(store / CATEGORY / "3")
        await registry.refresh()
        assert registry.serving() == {CATEGORY: "3"}  # from memory, within the grace
        await _scans_over(registry, GRACE_S * 1.5)
        assert registry.serving() == {CATEGORY: "2"} and recorded.swaps[-1] == (CATEGORY, "2")
        assert not registry.get(CATEGORY).pinned and recorded.retired == []
        # Removed with none left: the category is retired.
        shutil.rmtree(store / CATEGORY / "2")
        shutil.rmtree(store / CATEGORY / "1")
        await _scans_over(registry, GRACE_S * 1.5)
        assert recorded.retired == [(CATEGORY, "2")] and registry.serving() == {} and not registry.ready

    asyncio.run(main())


def test_a_newer_version_still_replaces_a_removed_one_at_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    fake_version(store, CATEGORY, "2")
    recorded = Recorded(store, grace_s=60)

    async def main() -> None:
        registry = await recorded.start()
        shutil.rmtree(store / CATEGORY / "2")
        fake_version(store, CATEGORY, "3")
        assert await registry.refresh() == [CATEGORY] and registry.serving() == {CATEGORY: "3"}

    asyncio.run(main())


def test_a_pin_holds_a_removed_version_but_not_a_removed_category(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    fake_version(store, CATEGORY, "2")
    fake_version(store, "tile", "1")
    fake_version(store, "tile", "2")
    recorded = Recorded(store)

    async def main() -> None:
        registry = await recorded.start()
        await registry.reload(CATEGORY, "1")
        await registry.reload("tile", "1")
        shutil.rmtree(store / CATEGORY / "1")  # the pinned version: served on from memory, as before
        shutil.rmtree(store / "tile")  # the whole category: retired, pin or not
        await _scans_over(registry, GRACE_S * 1.5)
        assert registry.serving() == {CATEGORY: "1"} and registry.get(CATEGORY).pinned
        assert recorded.retired == [("tile", "1")]

    asyncio.run(main())


def test_a_negative_grace_never_lets_go(tmp_path: Path) -> None:
    store = _two_categories(tmp_path)
    fake_version(store, CATEGORY, "2")
    recorded = Recorded(store, grace_s=-1)

    async def main() -> None:
        registry = await recorded.start()
        shutil.rmtree(store / "tile")
        shutil.rmtree(store / CATEGORY / "2")
        await _scans_over(registry, GRACE_S * 1.5)
        assert registry.serving() == {CATEGORY: "2", "tile": "1"} and recorded.retired == []
        with pytest.raises(RegistryError, match="tile is no longer in the model store; version 1 serves on until "
                                                "this server restarts"):
            await registry.reload("tile")

    asyncio.run(main())


def test_a_store_emptied_whole_retires_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unmounted volume leaves its mount point as an empty folder that lists fine: every
    category looked gone, and the whole line would have stopped after the grace."""
    store = _two_categories(tmp_path)
    recorded = Recorded(store)

    async def main() -> None:
        registry = await recorded.start()
        shutil.move(store, tmp_path / "away")
        store.mkdir()  # the mount point, empty
        await _scans_over(registry, GRACE_S * 2)
        assert recorded.retired == [] and registry.serving() == {CATEGORY: "1", "tile": "1"}
        shutil.rmtree(store)
        shutil.move(tmp_path / "away", store)
        shutil.rmtree(store / "tile")  # back, less one category: that one goes after the grace
        await _scans_over(registry, GRACE_S * 1.5)
        assert recorded.retired == [("tile", "1")]

    with caplog.at_level("WARNING", logger="service.pipeline.store_watch"):
        asyncio.run(main())
    empty = [r for r in caplog.records if "lists no category" in r.getMessage()]
    assert len(empty) == 1, "said once while it stays empty"
