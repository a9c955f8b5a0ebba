"""``load_engine``: the best engine for a version folder on this host.

Backends are imported only when chosen, so a host without torch or tensorrt still serves
ONNX, and no backend module imports this one (no cycle).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from models.manifest import Manifest
from service.engines.base import Engine, EngineError, cuda_index
from service.os_names import engine_thread_name, thread_named

if TYPE_CHECKING:
    from service.engines.onnxruntime import Provider

log = logging.getLogger(__name__)


def load_engine(version_dir: str | Path, kind: str = "auto", device: str = "auto",
                threads: int | None = None, max_batch_size: int = 64,
                tensorrt_cache_dir: Path | None = None, tensorrt_cache_max_bytes: int | None = None) -> Engine:
    """The best engine for this host: ``auto`` tries TensorRT (plan), then ONNX Runtime
    (:func:`backends_to_try`). ``device``: ``auto`` (a GPU when one is usable, else the CPU),
    ``cpu``, or ``cuda[:N]``, which is that GPU or an :class:`EngineError`, never the CPU.
    ``max_batch_size`` also bounds the optimisation profile ONNX Runtime's TensorRT provider
    builds (batches 1..max_batch_size at the model's size), as the plan's profile bounds the
    plan; ``tensorrt_cache_dir``: where that provider caches its engines
    (``MSFLOW_ORT_TENSORRT_CACHE_DIR``; None: its default folder), within
    ``tensorrt_cache_max_bytes`` (``MSFLOW_ORT_TENSORRT_CACHE_MAX_BYTES``; None: its default).

    Built under the thread name ``engine-<category>``, so the threads a backend starts here
    (onnxruntime's intra-op pool) carry it in ``top -H`` (:mod:`service.os_names`)."""
    version_dir = Path(version_dir)
    manifest = Manifest.read(version_dir)
    with thread_named(engine_thread_name(manifest.category)):
        return _load(version_dir, manifest, kind, device, threads, max_batch_size, tensorrt_cache_dir,
                     tensorrt_cache_max_bytes)


KINDS = ("auto", "tensorrt", "onnx", "torch", "null")


def backends_to_try(kind: str, device: str, has_plan: bool) -> list[str]:
    """The backends :func:`load_engine` tries, in order, for ``kind`` on ``device``.

    ``auto``: the TensorRT plan first when the version has one, then ONNX Runtime; but with
    ``device=cpu`` straight to ONNX Runtime: a plan runs on CUDA only, and the operator asked
    for the CPU. Pure (no backend imported), so the choice is testable on any host."""
    if kind not in KINDS:
        raise EngineError(f"unknown engine kind {kind!r}; choose auto, tensorrt, onnx, torch (or null, for benchmarks)")
    if kind == "auto":
        return ["tensorrt", "onnx"] if has_plan and device != "cpu" else ["onnx"]
    return [kind]


def onnx_providers(device: str) -> list[Provider] | None:
    """onnxruntime's providers for ``device``. ``auto``: None, the engine's default order
    (TensorRT -> CUDA -> CPU, as available, so a host without a GPU serves on the CPU).
    ``cuda[:N]``: the GPU providers on device N (CPU last, for nodes no GPU provider takes);
    the engine then refuses to fall back to the CPU (``OnnxEngine(cuda_device=N)``)."""
    index = cuda_index(device)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if index is None:
        return None
    return [("TensorrtExecutionProvider", {"device_id": index}), ("CUDAExecutionProvider", {"device_id": index}),
            "CPUExecutionProvider"]


def _load(version_dir: Path, manifest: Manifest, kind: str, device: str, threads: int | None,
          max_batch_size: int, tensorrt_cache_dir: Path | None = None,
          tensorrt_cache_max_bytes: int | None = None) -> Engine:
    *first, last = backends_to_try(kind, device, manifest.tensorrt is not None)
    for backend in first:  # auto's TensorRT: a plan this host cannot run falls back
        try:
            return _build(backend, version_dir, manifest, device, threads, max_batch_size, tensorrt_cache_dir,
                          tensorrt_cache_max_bytes)
        except EngineError as e:
            log.warning("%s engine not usable here (%s); using %s", backend, e, last)
    return _build(last, version_dir, manifest, device, threads, max_batch_size, tensorrt_cache_dir,
                  tensorrt_cache_max_bytes)


def _build(backend: str, version_dir: Path, manifest: Manifest, device: str, threads: int | None,
           max_batch_size: int, tensorrt_cache_dir: Path | None = None,
           tensorrt_cache_max_bytes: int | None = None) -> Engine:
    if backend == "onnx":
        from service.engines.onnxruntime import OnnxEngine

        return OnnxEngine(version_dir, onnx_providers(device), threads, manifest=manifest,
                          max_batch_size=max_batch_size, cuda_device=cuda_index(device),
                          tensorrt_cache_dir=tensorrt_cache_dir, tensorrt_cache_max_bytes=tensorrt_cache_max_bytes)
    if backend == "null":  # benchmarks only (service/engines/null.py): never chosen by "auto"
        from service.engines.null import NullEngine

        return NullEngine(version_dir, manifest=manifest, max_batch_size=max_batch_size)
    if backend == "torch":  # torch parses the device itself (any torch device string)
        from service.engines.torch import TorchEngine

        return TorchEngine(version_dir, device=device, manifest=manifest, max_batch_size=max_batch_size)
    from service.engines.tensorrt import TensorRTEngine

    return TensorRTEngine(version_dir, manifest=manifest, max_batch_size=max_batch_size, device=device)
