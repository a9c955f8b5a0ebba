"""The TensorRT engine: the graph handed to TensorRT computes exactly the same, a plan's
compatibility rules (pure, so testable without a GPU), a plan refused without a GPU (``auto``
falling back to ONNX Runtime), building one needing TensorRT and CUDA, and, on a CUDA host with
TensorRT, a built plan's parity with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import CPU, TEST_INPUT_SIZE, _copy_version, _has_cuda, _rewrite_manifest
from engine_fixtures import test_set  # noqa: F401  (fixtures)
from models.manifest import Manifest, TensorRTInfo, file_entry
from service.engines.base import EngineError
from service.engines.factory import load_engine
from service.engines.onnxruntime import OnnxEngine
from service.engines.tensorrt import check_plan_compatible

NO_GPU = "no CUDA GPU on this host: run deploy/gpu-check.sh on one"


def test_tensorrt_input_cast_is_exact(version_dir: Path, test_set) -> None:
    """The graph handed to TensorRT (uint8 input cast to float first) computes the same."""
    import onnx
    import onnxruntime as ort

    from models.tensorrt_build import cast_uint8_input

    model = onnx.load(str(version_dir / "model.onnx"))
    assert cast_uint8_input(model) >= 1
    consumers = [n for n in model.graph.node if "images" in n.input]
    assert [n.op_type for n in consumers] == ["Cast"]
    assert cast_uint8_input(model) == 0  # idempotent
    images, _ = test_set
    x = images[:2]
    ref = ort.InferenceSession(str(version_dir / "model.onnx"), providers=CPU).run(None, {"images": x})
    got = ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, {"images": x})
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


PLAN_INFO = TensorRTInfo(tensorrt_version="10.3.0", gpu_name="NVIDIA L4", compute_capability="8.9",
                         min_batch=1, opt_batch=8, max_batch=32)


def test_plan_compatibility_rules() -> None:
    check_plan_compatible(PLAN_INFO, "10.3.0", "NVIDIA L4", "8.9")  # the same host: fine
    with pytest.raises(EngineError, match=r"TensorRT 10\.3\.0 and this host has 10\.7\.0"):
        check_plan_compatible(PLAN_INFO, "10.7.0", "NVIDIA L4", "8.9")
    with pytest.raises(EngineError, match="NVIDIA A100"):
        check_plan_compatible(PLAN_INFO, "10.3.0", "NVIDIA A100-SXM4-80GB", "8.9")
    with pytest.raises(EngineError, match=r"compute capability 8\.9 .* 9\.0"):
        check_plan_compatible(PLAN_INFO, "10.3.0", "NVIDIA L4", "9.0")
    with pytest.raises(EngineError) as err:
        check_plan_compatible(PLAN_INFO, "9.0.1", "NVIDIA H100", "9.0")
    assert all(word in str(err.value) for word in ("9.0.1", "NVIDIA H100", "capability", "Rebuild"))


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_plan_refused_without_gpu_and_auto_falls_back(version_dir: Path, tmp_path: Path) -> None:
    if _has_cuda() and _has_tensorrt():
        pytest.skip("this host can run TensorRT: the refusal path is covered by test_plan_compatibility_rules")
    from service.engines.tensorrt import TensorRTEngine

    copy = _copy_version(version_dir, tmp_path)
    (copy / "model.plan").write_bytes(b"not a real plan")
    files = {**Manifest.read(copy).files, "model.plan": file_entry(copy / "model.plan")}
    _rewrite_manifest(copy, tensorrt=PLAN_INFO, files=files)
    with pytest.raises(EngineError, match="TensorRT is not installed|no CUDA GPU"):
        TensorRTEngine(copy)
    with pytest.raises(EngineError):
        load_engine(copy, kind="tensorrt")
    engine = load_engine(copy, kind="auto", device="cpu")
    assert isinstance(engine, OnnxEngine) and engine.name == "onnxruntime-cpu"

    no_plan = _copy_version(version_dir, tmp_path / "no-plan")
    with pytest.raises(EngineError, match="no TensorRT plan"):
        TensorRTEngine(no_plan)


def test_build_plan_needs_tensorrt_and_cuda(version_dir: Path, tmp_path: Path) -> None:
    if _has_cuda() and _has_tensorrt():
        pytest.skip("TensorRT and CUDA are present: see test_tensorrt_engine_parity")
    from models.tensorrt_build import build_plan

    with pytest.raises(RuntimeError, match="TensorRT is not installed|CUDA GPU"):
        build_plan(version_dir / "model.onnx", tmp_path / "model.plan", TEST_INPUT_SIZE, 1, 2, 4)
    assert not (tmp_path / "model.plan").exists()


def test_tensorrt_engine_parity(version_dir: Path, tmp_path: Path, test_set) -> None:
    if not _has_cuda():
        pytest.skip(NO_GPU)
    if not _has_tensorrt():
        pytest.skip("TensorRT is not installed on this CUDA host (pip install tensorrt); "
                    "run deploy/gpu-check.sh for the full GPU check")
    import tensorrt

    from models.tensorrt_build import build_plan, plan_precision
    from msflow.parity import compare, precision_class
    from service.engines.tensorrt import TensorRTEngine

    copy = _copy_version(version_dir, tmp_path)
    info = build_plan(copy / "model.onnx", copy / "model.plan", TEST_INPUT_SIZE, 1, 2, 4)
    files = {**Manifest.read(copy).files, "model.plan": file_entry(copy / "model.plan")}
    # FP16 with TensorRT 10; TensorRT 11 has no FP16 builder flag and builds FP32
    assert info.precision == plan_precision(tensorrt.__version__, fp16=True)
    manifest = _rewrite_manifest(copy, tensorrt=info, files=files)
    engine = TensorRTEngine(copy)
    assert (engine.profile_min, engine.profile_max) == (1, 4)
    images, _ = test_set
    x = images[:6]  # more than the profile maximum (4): runs as two chunks
    got = engine.run(x)
    assert got[0].shape == (6,) and got[1].shape == (6, TEST_INPUT_SIZE, TEST_INPUT_SIZE)
    ref = OnnxEngine(copy, CPU).run(x)
    result = compare(ref, got, manifest.calibration, precision_class("tensorrt", manifest))
    assert result["passed"], result
    # the last chunk's image alone (a batch of 1, below the opt batch) answers within the same tolerances
    alone = engine.run(x[5:6])
    result = compare((ref[0][5:6], ref[1][5:6]), alone, manifest.calibration, precision_class("tensorrt", manifest))
    assert result["passed"], result
