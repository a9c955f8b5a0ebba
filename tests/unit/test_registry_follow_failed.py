"""A reload in force that fails (multi-process: another front end's reload followed, cut off
by the engine process going away): what it chose holds all the same, and the version it moved
away from stops serving (the category fails, 503) until a retry brings what it chose."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from harness import serves
from service.config import Settings
from service.engines.base import EngineError
from service.engines.factory import load_engine
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import ModelNotLoaded


class Flaky:
    """The engine factory, failing while ``down`` (the engine process away)."""

    def __init__(self) -> None:
        self.down = False

    def __call__(self, version_dir: Path, **kwargs: Any) -> Any:
        if self.down:
            raise EngineError("the engine process went away; retry")
        return load_engine(version_dir, **kwargs)


async def _a_follow_that_fails(store: Path, pinned_first: str | None, follow: str | None,
                               ) -> tuple[ModelRegistry, Flaky, list[LoadedModel]]:
    """A registry serving ``store`` (pinned to ``pinned_first`` by an operator here, where
    given) whose follow of another front end's reload of ``follow`` fails with the engine
    process away: the registry, its factory (still down) and the models it dropped."""
    factory = Flaky()
    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1), engine_factory=factory)
    dropped: list[LoadedModel] = []
    registry.on_drop = dropped.append
    registry.discover()
    await registry.load_all()
    if pinned_first is not None:
        await registry.reload("aaa", pinned_first)
    factory.down = True
    with pytest.raises(EngineError):
        await registry.reload("aaa", follow, in_force=True)
    return registry, factory, dropped


def test_a_failed_follow_of_a_pin_stops_serving_the_other_version_and_the_retry_serves_the_pin(
        two_version_store: Path) -> None:
    async def main() -> None:
        registry, factory, dropped = await _a_follow_that_fails(two_version_store, None, "1")
        with pytest.raises(ModelNotLoaded):  # not version 2 while the pin holds
            registry.get("aaa")
        assert [m.version for m in dropped] == ["2"] and "aaa" in registry.failed
        await registry.refresh()  # the store watch loads nothing in the pin's place
        assert "aaa" not in registry.serving()
        factory.down = False
        await registry.retry("aaa")  # the engine process back
        assert serves(registry) == ("1", True) and registry.failed == {}

    asyncio.run(main())


def test_a_failed_follow_of_an_unpin_stops_serving_the_pinned_version_and_the_watch_loads_the_newest(
        two_version_store: Path) -> None:
    async def main() -> None:
        # Pinned here, then the operator's unpin, followed.
        registry, factory, dropped = await _a_follow_that_fails(two_version_store, "1", None)
        with pytest.raises(ModelNotLoaded):
            registry.get("aaa")
        assert [m.version for m in dropped] == ["1"]
        factory.down = False
        await registry.refresh()  # no pin holds it any more: the watch (or the retry) loads the newest
        assert serves(registry) == ("2", False)

    asyncio.run(main())


def test_a_failed_follow_of_the_version_served_keeps_it_serving(two_version_store: Path) -> None:
    async def main() -> None:
        # The same pin, heard again.
        registry, _, dropped = await _a_follow_that_fails(two_version_store, "1", "1")
        assert serves(registry) == ("1", True) and dropped == []

    asyncio.run(main())
