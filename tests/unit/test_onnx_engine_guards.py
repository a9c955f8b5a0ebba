"""The ONNX Runtime engine over a real, hand-made ONNX graph (no trained model needed).

``tiny_onnx_version`` writes a version folder whose ``model.onnx`` maps uint8 images
``[B, S, S, 3]`` to an anomaly map (the mean over channels) and a score (the map's mean),
with a manifest listing the file's digest, as ``msflow export`` writes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from harness import fake_version  # noqa: E402
from models.manifest import Manifest, file_entry, sha256_file  # noqa: E402
from service.engines.onnxruntime import TENSORRT_PROVIDER, OnnxEngine  # noqa: E402


def tiny_onnx_version(store: Path, size: int = 16, graph_size: int | None = None, version: str = "1") -> Path:
    """A version of category ``aaa`` whose manifest says ``size``; its graph takes and answers
    ``graph_size`` (default: ``size``; a string: a dynamic axis of that name)."""
    from onnx import TensorProto, helper

    folder = fake_version(store, "aaa", version, size=size)
    side = size if graph_size is None else graph_size
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", side, side, 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", side, side])
    graph = helper.make_graph([
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "channels"], ["anomaly_map"], keepdims=0),
        helper.make_node("ReduceMean", ["anomaly_map", "plane"], ["score"], keepdims=0),
    ], "tiny", [images], [score, amap], initializer=[
        helper.make_tensor("channels", TensorProto.INT64, [1], [3]),
        helper.make_tensor("plane", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    manifest = Manifest.read(folder)
    manifest.model_copy(update={"files": {"model.onnx": file_entry(folder / "model.onnx")}}).write(folder)
    return folder


def test_the_tiny_version_serves_on_the_cpu(tmp_path: Path) -> None:
    engine = OnnxEngine(tiny_onnx_version(tmp_path / "store"))
    images = np.full((2, 16, 16, 3), 30, dtype=np.uint8)
    scores, maps = engine.run(images)
    assert engine.name == "onnxruntime-cpu" and scores.shape == (2,) and maps.shape == (2, 16, 16)
    assert np.allclose(scores, 30.0)


def test_a_host_whose_onnxruntime_offers_tensorrt_loads_the_version(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists TensorRT's provider whether or not TensorRT can start. The engine
    keys its TensorRT cache by the model's sha256, which it read from ``manifest.onnx.sha256``,
    a field the manifest never had: every load on such a host failed with AttributeError (not
    even an EngineError), so no GPU host served any version. Here the provider is listed and
    cannot start (no TensorRT in this onnxruntime): the version serves on the CPU, with its
    cache folder named by the model file's digest."""
    version = tiny_onnx_version(tmp_path / "store")
    listed = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*listed, TENSORRT_PROVIDER])
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match=TENSORRT_PROVIDER):  # onnxruntime's own, as on a host without TensorRT
        engine = OnnxEngine(version, tensorrt_cache_dir=cache)
    assert engine.name == "onnxruntime-cpu"
    assert (cache / sha256_file(version / "model.onnx")).is_dir()
    scores, _ = engine.run(np.zeros((1, 16, 16, 3), dtype=np.uint8))
    assert scores.shape == (1,)
