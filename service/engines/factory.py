"""``load_engine``: the best engine for a version folder on this host.

Backends are imported only when chosen, so a host without torch or tensorrt still serves
ONNX, and no backend module imports this one (no cycle).
"""

from __future__ import annotations

import logging
from pathlib import Path

from models.manifest import Manifest
from service.engines.base import Engine, EngineError
from service.os_names import engine_thread_name, thread_named

log = logging.getLogger(__name__)


def load_engine(version_dir: str | Path, kind: str = "auto", device: str = "auto",
                threads: int | None = None, max_batch_size: int = 64) -> Engine:
    """The best engine for this host: ``auto`` tries TensorRT (plan), then ONNX Runtime.

    Built under the thread name ``engine-<category>``, so the threads a backend starts here
    (onnxruntime's intra-op pool) carry it in ``top -H`` (:mod:`service.os_names`)."""
    version_dir = Path(version_dir)
    manifest = Manifest.read(version_dir)
    with thread_named(engine_thread_name(manifest.category)):
        return _load(version_dir, manifest, kind, device, threads, max_batch_size)


def _load(version_dir: Path, manifest: Manifest, kind: str, device: str, threads: int | None,
          max_batch_size: int) -> Engine:
    if kind == "onnx" or (kind == "auto" and manifest.tensorrt is None):
        return _onnx(version_dir, _onnx_providers(device), threads, manifest, max_batch_size)
    if kind == "null":  # benchmarks only (service/engines/null.py): never chosen by "auto"
        from service.engines.null import NullEngine

        return NullEngine(version_dir, manifest=manifest, max_batch_size=max_batch_size)
    if kind == "torch":
        from service.engines.torch import TorchEngine

        return TorchEngine(version_dir, device=device, manifest=manifest, max_batch_size=max_batch_size)
    if kind in ("tensorrt", "auto"):
        try:
            from service.engines.tensorrt import TensorRTEngine

            return TensorRTEngine(version_dir, manifest=manifest, max_batch_size=max_batch_size)
        except EngineError as e:
            if kind == "tensorrt":
                raise
            log.warning("TensorRT plan not usable here (%s); using ONNX Runtime", e)
            return _onnx(version_dir, _onnx_providers(device), threads, manifest, max_batch_size)
    raise EngineError(f"unknown engine kind {kind!r}; choose auto, tensorrt, onnx, torch (or null, for benchmarks)")


def _onnx_providers(device: str) -> list[str] | None:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return None


def _onnx(*args, **kwargs) -> Engine:  # type: ignore[no-untyped-def]
    from service.engines.onnxruntime import OnnxEngine

    return OnnxEngine(*args, **kwargs)
