"""A version folder over a real, hand-made ONNX graph, for engine and tool tests that need
onnxruntime to run a model but no trained one (training takes minutes on 2 cores)."""

from __future__ import annotations

from pathlib import Path

from harness import fake_version
from models.manifest import Manifest, file_entry


def tiny_onnx_version(store: Path, size: int = 16, version: str = "1", batch_dependent: bool = False,
                      source_run: Path | None = None) -> Path:
    """Category ``aaa`` at ``version``: ``model.onnx`` maps uint8 images ``[B, S, S, 3]`` to an
    anomaly map (the mean over channels) and a score (the map's mean), listed in the manifest
    with its digest, as ``msflow export`` writes it. ``batch_dependent``: the map has the whole
    batch's mean taken off, so an image's answer depends on the images batched with it (what a
    graph exported with batch statistics does)."""
    import onnx
    from onnx import TensorProto, helper

    folder = fake_version(store, "aaa", version, size=size)
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", size, size])
    nodes = [helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels", "channels"], ["gray"], keepdims=0)]
    if batch_dependent:
        nodes += [helper.make_node("ReduceMean", ["gray"], ["batch_mean"], keepdims=1),
                  helper.make_node("Sub", ["gray", "batch_mean"], ["anomaly_map"])]
    else:
        nodes += [helper.make_node("Identity", ["gray"], ["anomaly_map"])]
    nodes += [helper.make_node("ReduceMean", ["anomaly_map", "plane"], ["score"], keepdims=0)]
    graph = helper.make_graph(nodes, "tiny", [images], [score, amap], initializer=[
        helper.make_tensor("channels", TensorProto.INT64, [1], [3]),
        helper.make_tensor("plane", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    manifest = Manifest.read(folder)
    manifest.model_copy(update={"files": {"model.onnx": file_entry(folder / "model.onnx")},
                                "source_run": str(source_run) if source_run else None}).write(folder)
    return folder
