"""A retired category's gauges stay gone once everything that served it has drained, the
versions swapped out before it included. Before, only the lane of the version served at the
retirement let them go when it drained: a request (or a worker's jobs, whose deadline is
minutes) still on the version a swap had replaced finished after the retirement, its lane's
drain wrote ``msflow_queue_depth{category=...} 0`` back, and that series of a category no
longer served stayed until a restart."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from prometheus_client import generate_latest

from harness import CATEGORY, fake_version
from service.config import Settings
from service.pipeline.runtime import PipelineRuntime


def _series(runtime: PipelineRuntime, category: str) -> list[str]:
    text = generate_latest(runtime.metrics.registry).decode()
    return [line for line in text.splitlines() if not line.startswith("#") and f'category="{category}"' in line
            and line.startswith(("msflow_queue_depth", "msflow_model_info"))]


def test_a_lane_swapped_out_before_the_retirement_drains_without_bringing_its_gauges_back(tmp_path: Path) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    fake_version(store, "tile", "1")
    runtime = PipelineRuntime(Settings(model_store=store, engine="null", store_poll_s=1, store_removal_grace_s=0),
                              None)

    async def main() -> None:
        runtime.open()
        await runtime.registry.load_all()
        try:
            with runtime.pin(CATEGORY):  # a request, or a worker's jobs, on version 1
                fake_version(store, CATEGORY, "2")
                assert await runtime.registry.refresh() == [CATEGORY]  # 2 serves; 1's lane waits for its user
                with runtime.pin(CATEGORY):  # version 2's lane in use once
                    pass
                shutil.rmtree(store / CATEGORY)
                await runtime.registry.refresh()  # retired (grace 0)
                await asyncio.sleep(0.2)  # version 2's lane drained
                assert _series(runtime, CATEGORY) == []
            await asyncio.sleep(0.2)  # version 1's lane drained, after the retirement
            assert _series(runtime, CATEGORY) == []
            assert _series(runtime, "tile") != []
        finally:
            await runtime.close()

    asyncio.run(main())
