"""The engine contract: one small protocol, ``run(uint8 NHWC batch) -> (scores, maps)``,
its error, and the input check every backend shares.

An engine is a model-store version folder made executable. Loading verifies the
manifest's sha256s, so a corrupt or truncated file is an error at start-up, never a crash
at the first request.

Backends, one module each, imported lazily by :func:`service.engines.factory.load_engine`:

- :mod:`service.engines.onnxruntime`: onnxruntime; providers TensorRT -> CUDA -> CPU as available.
- :mod:`service.engines.tensorrt`: a prebuilt ``model.plan`` (CUDA only).
- :mod:`service.engines.torch`: the PyTorch model of the source run; the reference.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from models.manifest import Manifest

MAP_OUTPUT = "anomaly_map"


class EngineError(RuntimeError):
    """An engine cannot be built or run on this host."""


@runtime_checkable
class Engine(Protocol):
    """What the batcher calls. ``run`` is blocking and thread-safe for one caller at a time."""

    name: str  # "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-cpu", ...
    manifest: Manifest
    max_batch_size: int

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[B, S, S, 3]`` -> raw scores ``[B]`` (the calibrated output) and
        anomaly maps ``[B, S, S]`` (float32)."""
        ...


def cuda_index(device: str) -> int | None:
    """The CUDA device an explicit ``cuda`` / ``cuda:N`` names (``cuda`` is device 0), or None
    for ``auto`` and ``cpu``. Anything else is an :class:`EngineError`: a typo must not
    quietly serve on another device than the operator asked for."""
    if device in ("auto", "cpu"):
        return None
    kind, sep, index = device.partition(":")
    if kind == "cuda" and not sep:
        return 0
    if kind == "cuda" and index.isascii() and index.isdigit():
        return int(index)
    raise EngineError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


def check_batch(images: np.ndarray, size: int, max_batch: int) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise EngineError(f"engine takes uint8 [B,{size},{size},3], got {images.dtype} {list(images.shape)}")
    if not 1 <= images.shape[0] <= max_batch:
        raise EngineError(f"batch of {images.shape[0]} outside 1..{max_batch}")
    return np.ascontiguousarray(images)
