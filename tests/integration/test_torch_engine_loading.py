"""What the PyTorch engine refuses or applies when it loads a version: its source run gone
(or named by a relative path), half precision without CUDA, the version's own map sigma, and
any other model setting that differs from the run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import _copy_version, _has_cuda, _rewrite_manifest
from engine_fixtures import test_set  # noqa: F401  (fixtures)
from models.manifest import Manifest
from service.engines.base import EngineError


def test_torch_engine_needs_its_source_run(version_dir: Path, tmp_path: Path) -> None:
    from service.engines.torch import TorchEngine

    copy = _copy_version(version_dir, tmp_path)
    _rewrite_manifest(copy, source_run=str(tmp_path / "deleted-run"))
    with pytest.raises(EngineError, match="source run .* is gone"):
        TorchEngine(copy, device="cpu")
    if not _has_cuda():
        with pytest.raises(EngineError, match="CUDA"):
            TorchEngine(version_dir, device="cpu", half=True)


def test_torch_engine_applies_the_versions_map_sigma(version_dir: Path, trained_run: Path, tmp_path: Path,
                                                     test_set) -> None:
    """`export --map-sigma 2` of a run whose config says 4: the version serves sigma 2 (the
    smoothing is post-processing; the rest of the config must still match)."""
    import torch

    from models.runs import load_model
    from service.engines.torch import TorchEngine

    copy = _copy_version(version_dir, tmp_path)
    model_cfg = Manifest.read(copy).model
    assert model_cfg["map_sigma"] != 2.0
    _rewrite_manifest(copy, model={**model_cfg, "map_sigma": 2.0})
    engine = TorchEngine(copy, device="cpu")
    assert engine.model.config.map_sigma == 2.0
    reference, _ = load_model(trained_run, "cpu")
    reference.set_map_sigma(2.0)
    images = test_set[0][:2]
    with torch.no_grad():
        want = reference(torch.from_numpy(images), paper_maps=False)["anomaly_map"].numpy()
    _, maps = engine.run(images)
    assert np.abs(maps - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    # Any other setting that differs is still another model.
    _rewrite_manifest(copy, model={**model_cfg, "top_k": 0.05})
    with pytest.raises(EngineError, match="was exported from"):
        TorchEngine(copy, device="cpu")
    # A manifest whose settings are not valid (export once accepted --map-sigma -1): one EngineError.
    _rewrite_manifest(copy, model={**model_cfg, "map_sigma": -1.0})
    with pytest.raises(EngineError, match="not valid"):
        TorchEngine(copy, device="cpu")


def test_torch_engine_names_a_relative_source_run(version_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from service.engines.torch import TorchEngine

    copy = _copy_version(version_dir, tmp_path)
    _rewrite_manifest(copy, source_run="runq/brick")  # what export wrote for `--run runq/brick` before
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineError, match="relative .* re-export"):
        TorchEngine(copy, device="cpu")
    from msflow.parity import parity_images

    with pytest.raises(SystemExit, match="relative .* re-export"):
        parity_images(Manifest.read(copy), 4)
