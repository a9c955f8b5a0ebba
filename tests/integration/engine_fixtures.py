"""Shared parts of the runtime-engine tests on the trained and exported fixture model
(``test_cpu_engines``, ``test_exported_version``, ``test_tensorrt_engine``,
``test_torch_engine_loading``, ``test_bench_and_parity_tools``): the demo test set at the
model's input size, an ONNX Runtime engine on CPU, private copies of the fixture version (and
their manifests rewritten), and whether this host has CUDA. Test modules import this, never
each other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.manifest import Manifest
from service.engines.onnxruntime import OnnxEngine

TEST_CATEGORY = "brick"  # as in conftest.py (tests/ is not a package)
TEST_INPUT_SIZE = 128
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def test_set(demo_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The demo test images of the category (normal and defective) and their labels."""
    from models.data import MVTecCategory
    from models.data_loading import load_images

    samples = MVTecCategory(demo_root, TEST_CATEGORY).test_samples()
    return load_images(samples, TEST_INPUT_SIZE), np.array([s.label for s in samples])


@pytest.fixture(scope="module")
def onnx_engine(version_dir: Path) -> OnnxEngine:
    return OnnxEngine(version_dir, CPU)


def _copy_version(version_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared fixture version (never modify the original)."""
    dst = tmp_path / TEST_CATEGORY / version_dir.name
    shutil.copytree(version_dir, dst)
    return dst


def _rewrite_manifest(version_dir: Path, **update) -> Manifest:
    manifest = Manifest.read(version_dir).model_copy(update=update)
    manifest.write(version_dir)
    return manifest


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
