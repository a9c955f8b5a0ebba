"""Helpers of the in-process pipeline tests (``test_pipeline_inprocess``,
``test_admission_inprocess``): the settings of a runtime over a model store (CPU, one engine
thread, no store polling, small batches) and a runtime with every category loaded, closed
afterwards. Test modules import this, never each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from service.config import Settings
from service.pipeline.runtime import PipelineRuntime


def settings_for(store: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(model_store=store, device="cpu", intra_op_threads=1, decode_threads=2,
                                store_poll_s=0, max_batch_size=4, max_queue_delay_ms=200)
    return Settings(**{**base, **overrides})


@contextlib.asynccontextmanager
async def loaded_runtime(store: Path, **overrides: Any) -> AsyncIterator[PipelineRuntime]:
    """A runtime with every category of ``store`` loaded and warm; closed afterwards."""
    rt = PipelineRuntime(settings_for(store, **overrides), None)
    rt.open()
    try:
        await rt.registry.load_all()
        yield rt
    finally:
        await rt.close()
