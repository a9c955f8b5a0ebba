"""An operator's threshold override belongs to one version: when the registry swaps in another
version the override stops deciding verdicts, and the log says so (it changed without a word)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from harness import CATEGORY, fake_version
from service.config import Settings
from service.pipeline.registry import ModelRegistry
from service.pipeline.thresholds import ThresholdOverrides


def test_a_new_version_swapped_in_says_the_old_versions_override_no_longer_applies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    settings = Settings(model_store=store, engine="null", store_poll_s=1)
    registry = ModelRegistry(settings)
    registry.thresholds = ThresholdOverrides(settings, None)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        await registry.thresholds.set(CATEGORY, "1", 0.75)
        fake_version(store, CATEGORY, "2")
        with caplog.at_level(logging.WARNING, logger="service.pipeline.registry"):
            await registry.refresh()
        assert registry.serving() == {CATEGORY: "2"}
        said = [r.getMessage() for r in caplog.records if "override" in r.getMessage()]
        assert said == [f"{CATEGORY}: the threshold override of version 1 (0.75) does not apply to version 2, "
                        "which decides at its calibrated threshold 0.5; set one for it with PUT threshold if needed"]

        caplog.clear()  # back to 1 by an operator's reload: its override applies again, nothing to say
        with caplog.at_level(logging.WARNING, logger="service.pipeline.registry"):
            await registry.reload(CATEGORY, "1")
        assert registry.thresholds.threshold(registry.get(CATEGORY).manifest) == 0.75
        assert not [r for r in caplog.records if "override" in r.getMessage()]

    asyncio.run(main())
