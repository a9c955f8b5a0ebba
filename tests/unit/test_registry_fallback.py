"""The registry serves the newest version that loads, and counts every failed load."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from harness import CATEGORY, fake_version
from service.config import Settings
from service.engines.base import EngineError
from service.engines.null import NullEngine
from service.pipeline.registry import ModelRegistry


def _registry(store: Path, broken: set[str], failures: list[str]) -> ModelRegistry:
    """A registry whose engine cannot load the versions named in ``broken`` (a graph the
    runtime refuses, a plan for another GPU)."""
    def factory(version_dir: Path, **_: Any) -> NullEngine:
        if version_dir.name in broken:
            raise EngineError(f"cannot load {version_dir}/model.onnx: INVALID_PROTOBUF")
        return NullEngine(version_dir, max_batch_size=2)

    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1), engine_factory=factory)

    def failed(category: str) -> None:
        failures.append(category)
        # What the service's gauge reads at this call (msflow_model_versions_failed): the
        # version that just failed is already listed.
        standing.append(len(registry.failed_versions(category)))

    standing: list[int] = []
    registry.on_load_failure = failed
    registry.standing = standing  # type: ignore[attr-defined]
    return registry


def test_start_up_after_a_broken_export_serves_the_newest_version_that_loads(tmp_path: Path) -> None:
    """Replicas running before a broken export (2, 3) keep serving 1; a replica started after it
    served nothing for the category (not ready) until a restart found a newer good version."""
    store = tmp_path / "store"
    for version in ("1", "2", "3"):
        fake_version(store, CATEGORY, version)
    failures: list[str] = []
    registry = _registry(store, {"2", "3"}, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        assert registry.serving() == {CATEGORY: "1"} and registry.ready and registry.failed == {}
        assert not registry.get(CATEGORY).pinned  # a newer good export is still picked up
        assert failures == [CATEGORY, CATEGORY]
        assert registry.standing == [1, 2]  # type: ignore[attr-defined]
        failed = registry.describe(CATEGORY).failed_versions  # shown while 1 serves, newest last
        assert list(failed) == ["2", "3"] and "INVALID_PROTOBUF" in failed["3"]
        assert await registry.refresh() == []  # the broken ones are not tried again by the watch
        assert failures == [CATEGORY, CATEGORY]
        fake_version(store, CATEGORY, "4")
        assert await registry.refresh() == [CATEGORY] and registry.serving() == {CATEGORY: "4"}
        shutil.rmtree(store / CATEGORY / "3")  # a broken version removed from the store is no longer listed
        assert list(registry.describe(CATEGORY).failed_versions) == ["2"]

    asyncio.run(main())


def test_a_category_with_no_loadable_version_fails_with_the_newest_versions_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for version in ("1", "2"):
        fake_version(store, CATEGORY, version)
    failures: list[str] = []
    broken = {"1", "2"}
    registry = _registry(store, broken, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        assert registry.serving() == {} and registry.status() == {CATEGORY: "failed"}
        assert "/2/model.onnx" in registry.failed[CATEGORY] and len(failures) == 2
        broken.discard("1")  # fixed in place (or the engine process back): an operator's reload
        model = await registry.reload(CATEGORY)
        assert model.version == "1" and not model.pinned and registry.failed == {}

    asyncio.run(main())


def test_a_failed_reload_keeps_the_served_version_and_is_counted(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    failures: list[str] = []
    registry = _registry(store, {"2"}, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        fake_version(store, CATEGORY, "2")
        assert await registry.refresh() == [] and failures == [CATEGORY]
        try:
            await registry.reload(CATEGORY)
        except EngineError:
            pass
        else:
            raise AssertionError("the reload of a broken newest version succeeded")
        assert failures == [CATEGORY, CATEGORY] and registry.serving() == {CATEGORY: "1"}

    asyncio.run(main())


def test_ending_a_pin_serves_the_newest_version_that_loads(tmp_path: Path) -> None:
    """An operator pinned version 1, then a broken export (3) landed. Ending the pin (a reload
    with no version) tried version 3 alone: 422, and the pin held, so the operator could not
    end it until 3 was fixed; a front end following the unpin dropped the category (503). Now
    it serves what the watch would: the newest version that loads."""
    store = tmp_path / "store"
    for version in ("1", "2"):
        fake_version(store, CATEGORY, version)
    failures: list[str] = []
    registry = _registry(store, {"3"}, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        assert (await registry.reload(CATEGORY, "1")).pinned
        fake_version(store, CATEGORY, "3")  # the broken export
        assert await registry.refresh() == []  # pinned: the watch leaves it
        model = await registry.reload(CATEGORY)  # the operator ends the pin
        assert (model.version, model.pinned) == ("2", False) and registry.serving() == {CATEGORY: "2"}
        assert not registry.describe(CATEGORY).pinned
        assert await registry.refresh() == []  # the watch tries 3 once, and records it failed
        assert "INVALID_PROTOBUF" in registry.describe(CATEGORY).failed_versions["3"]
        assert registry.serving() == {CATEGORY: "2"}

        assert (await registry.reload(CATEGORY, "1")).pinned  # pinned again, then a follow of an unpin
        model = await registry.reload(CATEGORY, in_force=True)  # (another front end's, multi-process)
        assert (model.version, model.pinned) == ("2", False) and registry.ready

    asyncio.run(main())


def test_ending_a_pin_when_no_newer_version_loads_serves_the_pinned_one_unpinned(tmp_path: Path) -> None:
    store = tmp_path / "store"
    for version in ("1", "2", "3"):
        fake_version(store, CATEGORY, version)
    failures: list[str] = []
    registry = _registry(store, set(), failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        assert (await registry.reload(CATEGORY, "1")).pinned
        shutil.rmtree(store / CATEGORY / "2")
        (store / CATEGORY / "3" / "manifest.json").write_text("{not json")  # no longer a complete version
        model = await registry.reload(CATEGORY)
        assert (model.version, model.pinned) == ("1", False)
        fake_version(store, CATEGORY, "4")
        assert await registry.refresh() == [CATEGORY] and registry.serving() == {CATEGORY: "4"}  # watched again

    asyncio.run(main())
