"""A model version made ready to serve (:class:`LoadedModel`, :func:`build_version`): its
engine built by an :data:`EngineFactory`, checked to lie where its manifest says
(:func:`check_placed`) and warmed with one full batch (:func:`warm_engine`). The registry
(:mod:`service.pipeline.registry`) chooses versions and swaps them; the engine process warms
what it hosts the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from models.manifest import MANIFEST, Manifest, ManifestError
from service.config import Settings
from service.engines.base import Engine
from service.os_names import engine_thread_name, thread_named
from service.pipeline.registry_errors import PinnedVersionRemoved, RegistryError

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


def build_version(settings: Settings, engine_factory: EngineFactory, version_dir: Path, pinned: bool,
                  in_force: bool = False) -> LoadedModel:
    """Blocking: read and check the manifest of ``version_dir`` (``<store>/<category>/<version>``),
    build the engine, warm it. A pin in force whose folder is gone is built if the engine
    factory still can (the engine process holds it, with its manifest), and checked on the
    engine's manifest."""
    category, version = version_dir.parent.name, version_dir.name
    removed = in_force and not (version_dir / MANIFEST).is_file()
    if not removed:
        manifest = Manifest.read(version_dir)
        check_placed(version_dir, manifest, category, version)
    s = settings
    try:
        engine = engine_factory(version_dir, kind=s.engine, device=s.device, threads=s.intra_op_threads,
                                max_batch_size=s.max_batch_size, tensorrt_cache_dir=s.ort_tensorrt_cache_dir,
                                tensorrt_cache_max_bytes=s.ort_tensorrt_cache_max_bytes)
    except Exception as exc:
        if not removed:
            raise
        raise PinnedVersionRemoved(
            f"{category}: pinned version {version} was removed from the model store and no process of this "
            f"server holds it any more; nothing else serves {category} while the pin holds: reload it "
            f"(POST /v1/models/{category}/reload, ?version= to pin another); loading it: {exc}") from exc
    try:
        if removed:
            check_placed(version_dir, engine.manifest, category, version)
        warmup_ms = warm_engine(engine, settings.max_batch_size)
    except BaseException:
        release = getattr(engine, "close", None)  # an engine held elsewhere (engine process) lets go
        if release is not None:
            release()
        raise
    return LoadedModel(category=category, version=version, version_dir=version_dir, engine=engine,
                       loaded_at=datetime.now(timezone.utc), warmup_ms=warmup_ms, pinned=pinned)


__all__ = ["EngineFactory", "LoadedModel", "build_version", "check_placed", "warm_engine"]
