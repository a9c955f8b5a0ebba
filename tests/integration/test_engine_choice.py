"""Which engine serves, on which device, from which weights (beside test_cpu_engines.py and
test_tensorrt_engine.py).

An explicit ``cuda[:N]`` is that GPU or an EngineError, never a quiet CPU engine; ``auto``
still falls back to the CPU; ``device=cpu`` never picks a TensorRT plan; and the torch
engine serves only the checkpoint its version was exported from.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.manifest import MANIFEST, Manifest, TensorRTInfo, file_entry, sha256_file
from service.engines.base import EngineError
from service.engines.factory import load_engine

TEST_CATEGORY = "brick"  # as in conftest.py (tests/ is not a package)
PLAN_INFO = TensorRTInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA L4", compute_capability="8.9",
                         min_batch=1, opt_batch=8, max_batch=32)


def _copy_version(version_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / TEST_CATEGORY / version_dir.name
    shutil.copytree(version_dir, dst)
    return dst


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# ------------------------------------------------------------------ devices

def test_device_names_and_the_onnxruntime_providers_they_give() -> None:
    from service.engines.base import cuda_index
    from service.engines.factory import onnx_providers

    assert cuda_index("auto") is None and cuda_index("cpu") is None
    assert cuda_index("cuda") == 0 and cuda_index("cuda:1") == 1
    for typo in ("gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:1.0", "CUDA"):
        with pytest.raises(EngineError, match="auto, cpu, cuda, cuda:N"):
            onnx_providers(typo)
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    assert onnx_providers("auto") is None  # the engine's default order, CPU when no GPU provider works
    # The device index reaches onnxruntime: before, cuda:1 gave None (every provider, device 0 or the CPU).
    assert onnx_providers("cuda:1") == [("TensorrtExecutionProvider", {"device_id": 1}),
                                        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert onnx_providers("cuda")[1] == ("CUDAExecutionProvider", {"device_id": 0})


def test_explicit_cuda_is_that_gpu_or_an_error_and_auto_falls_back(version_dir: Path) -> None:
    if _ort_has_cuda():  # a GPU host: the session runs on the device asked for
        engine = load_engine(version_dir, "onnx", device="cuda:0")
        assert engine.name in ("onnxruntime-cuda", "onnxruntime-tensorrt"), engine.name
        assert engine.session.get_provider_options()["CUDAExecutionProvider"]["device_id"] == "0"
    else:  # before: onnxruntime-cpu, in silence
        for kind in ("onnx", "auto"):
            for device, index in (("cuda", 0), ("cuda:1", 1)):
                with pytest.raises(EngineError, match=rf"cuda:{index} asked for, but .*no CUDA provider"):
                    load_engine(version_dir, kind, device=device)
        # auto: a host without a GPU provider serves on the CPU, as before
        assert load_engine(version_dir, "onnx", device="auto").name == "onnxruntime-cpu"
        assert load_engine(version_dir, "auto", device="auto").name == "onnxruntime-cpu"
    assert load_engine(version_dir, "onnx", device="cpu").name == "onnxruntime-cpu"
    with pytest.raises(EngineError, match="auto, cpu, cuda, cuda:N"):
        load_engine(version_dir, "onnx", device="gpu")


# ------------------------------------------------------------------ engine kind

def test_auto_on_the_cpu_never_picks_a_tensorrt_plan(version_dir: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # A version with a plan, served with MSFLOW_DEVICE=cpu: ONNX Runtime on the CPU, without
    # TensorRT even being tried (before: tried, and on a GPU host it served on the GPU).
    copy = _copy_version(version_dir, tmp_path)
    (copy / "model.plan").write_bytes(b"not a real plan")
    manifest = Manifest.read(copy)
    manifest.model_copy(update={"tensorrt": PLAN_INFO,
                                "files": {**manifest.files, "model.plan": file_entry(copy / "model.plan")}}).write(copy)
    with caplog.at_level(logging.WARNING, logger="service.engines.factory"):
        engine = load_engine(copy, kind="auto", device="cpu")
    assert engine.name == "onnxruntime-cpu"
    assert not [r for r in caplog.records if r.name == "service.engines.factory"], caplog.text
    with pytest.raises(EngineError, match="CUDA only"):
        load_engine(copy, kind="tensorrt", device="cpu")

    from service.engines.factory import backends_to_try  # the choice itself, without tensorrt

    assert backends_to_try("auto", "cpu", has_plan=True) == ["onnx"]
    assert backends_to_try("auto", "auto", has_plan=True) == ["tensorrt", "onnx"]
    assert backends_to_try("auto", "cuda:1", has_plan=True) == ["tensorrt", "onnx"]
    assert backends_to_try("auto", "auto", has_plan=False) == ["onnx"]
    assert backends_to_try("torch", "cpu", has_plan=True) == ["torch"]
    with pytest.raises(EngineError, match="unknown engine kind"):
        backends_to_try("fastest", "auto", has_plan=True)


# ------------------------------------------------------------------ the torch engine's weights

def test_torch_engine_serves_only_the_exported_checkpoint(version_dir: Path, trained_run: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from service.engines.torch import TorchEngine

    manifest = Manifest.read(version_dir)
    assert manifest.source_checkpoint_sha256 == sha256_file(trained_run / "checkpoint.pt")  # recorded at export
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "checkpoint.pt", run / "checkpoint.pt")
    copy = _copy_version(version_dir, tmp_path)
    manifest.model_copy(update={"source_run": str(run)}).write(copy)
    x = np.zeros((1, manifest.input_size, manifest.input_size, 3), np.uint8)
    TorchEngine(copy, device="cpu").run(x)

    # The run retrained (or resumed) in place: same config, other weights.
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["flows"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in checkpoint["flows"].items()}
    torch.save(checkpoint, run / "checkpoint.pt")
    with pytest.raises(EngineError, match="another checkpoint than .* was exported from"):
        TorchEngine(copy, device="cpu")
    with pytest.raises(EngineError, match="another checkpoint"):
        load_engine(copy, kind="torch", device="cpu")

    # A manifest written before the hash was recorded still loads, with a warning.
    raw = json.loads((copy / MANIFEST).read_text())
    del raw["source_checkpoint_sha256"]
    (copy / MANIFEST).write_text(json.dumps(raw))
    assert Manifest.read(copy).source_checkpoint_sha256 is None
    with caplog.at_level(logging.WARNING, logger="service.engines.torch"):
        TorchEngine(copy, device="cpu")
    assert "records no checkpoint sha256" in caplog.text
