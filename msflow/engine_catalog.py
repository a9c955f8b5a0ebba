"""The engines a host can run, by name, and the demo images to run them on.

Shared by ``msflow bench`` (speed) and ``msflow.parity`` (agreement with ONNX Runtime on
CPU): both ask which engines exist here (``default_engines``, ``unavailable_reason``), build
them the same way (``make_engine``) and feed them the version's own held-out normal or test
images (``demo_images``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest, list_versions
from service.engines.base import Engine, EngineError

log = logging.getLogger(__name__)

CPU_ENGINES = ("onnxruntime-cpu", "torch-cpu")
CUDA_ENGINES = ("onnxruntime-cuda", "tensorrt", "torch-cuda-fp16", "torch-cuda-fp16+cudagraphs")
KNOWN_ENGINES = (*CPU_ENGINES, *CUDA_ENGINES, "torch-cuda", "torch-cuda+cudagraphs")


# ------------------------------------------------------------------ model and inputs

def resolve_version(path: str | Path) -> Path:
    """A version folder, or the newest version of a category folder."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    versions = list_versions(p)
    if not versions:
        raise EngineError(f"{p} is neither a model-store version (no manifest.json) nor a category with versions")
    return p / versions[-1]


def _source_config(manifest: Manifest) -> dict[str, Any]:
    run = Path(manifest.source_run) if manifest.source_run else None
    if run is None or not (run / "config.json").is_file():
        return {}
    return json.loads((run / "config.json").read_text())


def holdout_samples(manifest: Manifest) -> list[Any]:
    """The held-out normal images of the source run that still exist."""
    from models.data import Sample

    run = Path(manifest.source_run) if manifest.source_run else None
    if run is None or not (run / "holdout.json").is_file():
        return []
    paths = [Path(p) for p in json.loads((run / "holdout.json").read_text())]
    return [Sample(path=p, label=0, defect_type="good", mask_path=None) for p in paths if p.is_file()]


def test_samples(manifest: Manifest) -> list[Any]:
    """Labelled test images (normal and defective) of the source run's data set, if present."""
    from models.data import MVTecCategory

    cfg = _source_config(manifest)
    data, category = cfg.get("data"), cfg.get("category")
    if not data or not category or not (Path(data) / category / "test").is_dir():
        return []
    try:
        return MVTecCategory(data, category).test_samples()
    except Exception as e:  # a partial data set must not stop a benchmark
        log.warning("cannot list the test images of %s/%s: %s", data, category, e)
        return []


def demo_images(manifest: Manifest, limit: int = 32, seed: int = 0) -> tuple[np.ndarray, str]:
    """Real demo images for timing (held-out normals, else test images), else random pixels."""
    from models.data_loading import load_images

    size = manifest.input_size
    for what, samples in (("held-out normal images of the source run", holdout_samples(manifest)),
                          ("test images of the source run's data set", test_samples(manifest))):
        if samples:
            return load_images(samples[:limit], size), f"{min(len(samples), limit)} {what}"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (limit, size, size, 3), dtype=np.uint8), "random uint8 pixels (no demo images found)"


def tile_batch(images: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


# ------------------------------------------------------------------ engines

def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def unavailable_reason(name: str, manifest: Manifest) -> str | None:
    """Why engine ``name`` cannot run on this host (None when it may)."""
    if name not in KNOWN_ENGINES:
        return f"unknown engine (known: {', '.join(KNOWN_ENGINES)})"
    if name.startswith("torch") and not (manifest.source_run and Path(manifest.source_run).is_dir()):
        return f"source run {manifest.source_run} is gone"
    if name in CPU_ENGINES:
        return None
    if not cuda_available():
        return "no CUDA GPU on this host"
    if name == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if name == "tensorrt":
        if manifest.tensorrt is None:
            return "this version has no TensorRT plan (export with --tensorrt)"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed"
    return None


def make_engine(name: str, version_dir: Path, manifest: Manifest, max_batch_size: int,
                threads: int | None = None) -> Engine:
    """Build engine ``name`` (one of ``KNOWN_ENGINES``); EngineError when it cannot run here.
    ``threads``: onnxruntime intra-op threads (torch's are process-wide: ``torch.set_num_threads``)."""
    from service.engines.onnxruntime import OnnxEngine

    if name == "onnxruntime-cpu":
        return OnnxEngine(version_dir, ["CPUExecutionProvider"], threads, manifest=manifest,
                          max_batch_size=max_batch_size)
    if name == "onnxruntime-cuda":
        engine = OnnxEngine(version_dir, ["CUDAExecutionProvider", "CPUExecutionProvider"], manifest=manifest,
                            max_batch_size=max_batch_size)
        if engine.name != name:
            raise EngineError(f"onnxruntime fell back to {engine.name}")
        return engine
    if name == "tensorrt":
        from service.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(version_dir, manifest=manifest, max_batch_size=max_batch_size)
    if name.startswith("torch-"):
        from service.engines.torch import TorchEngine

        device = "cuda" if name.startswith("torch-cuda") else "cpu"
        return TorchEngine(version_dir, device=device, manifest=manifest, max_batch_size=max_batch_size,
                           half="fp16" in name, cuda_graphs=name.endswith("+cudagraphs"))
    raise EngineError(f"unknown engine {name!r} (known: {', '.join(KNOWN_ENGINES)})")


def default_engines(device: str) -> list[str]:
    if device == "cpu":
        return list(CPU_ENGINES)
    if device.startswith("cuda"):
        return list(CUDA_ENGINES)
    return list(CPU_ENGINES) + (list(CUDA_ENGINES) if cuda_available() else [])
