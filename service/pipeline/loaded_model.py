"""A model version made ready to serve (:class:`LoadedModel`): its engine built by an
:data:`EngineFactory`, checked to lie where its manifest says (:func:`check_placed`) and
warmed with one full batch (:func:`warm_engine`). The registry (:mod:`service.pipeline.registry`)
chooses versions and swaps them; the engine process warms what it hosts the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from models.manifest import Manifest, ManifestError
from service.engines.base import Engine
from service.os_names import engine_thread_name, thread_named
from service.pipeline.registry_errors import RegistryError

EngineFactory = Callable[..., Engine]


@dataclass(frozen=True)
class LoadedModel:
    category: str
    version: str
    version_dir: Path
    engine: Engine
    loaded_at: datetime
    warmup_ms: float
    pinned: bool

    @property
    def manifest(self) -> Manifest:
        return self.engine.manifest


def check_placed(version_dir: Path, manifest: Manifest, category: str, version: str) -> None:
    if manifest.category != category or manifest.version != version:
        raise ManifestError(f"{version_dir} holds the manifest of {manifest.category}/{manifest.version}; "
                            "a copied or misplaced version folder")


def warm_engine(engine: Engine, max_batch_size: int) -> float:
    """Run one full batch of zeros through ``engine``, check the output shapes; milliseconds taken."""
    size = engine.manifest.input_size
    batch = max(1, min(max_batch_size, int(engine.max_batch_size)))
    started = time.perf_counter()
    with thread_named(engine_thread_name(engine.manifest.category)):  # threads a first run starts (OpenMP's)
        scores, maps = engine.run(np.zeros((batch, size, size, 3), dtype=np.uint8))
    if np.shape(scores) != (batch,) or np.shape(maps) != (batch, size, size):
        raise RegistryError(f"engine {engine.name} returned scores {np.shape(scores)} and maps "
                            f"{np.shape(maps)} for a batch of {batch} at {size}x{size}")
    if not np.all(np.isfinite(scores)):
        raise RegistryError(f"engine {engine.name} returns non-finite scores on its warm-up batch")
    return (time.perf_counter() - started) * 1e3


__all__ = ["EngineFactory", "LoadedModel", "check_placed", "warm_engine"]
