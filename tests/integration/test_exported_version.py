"""The exported fixture version's contract: its manifest round-trips (and a manifest that is
not one is refused), a tampered or truncated model is refused at load, its calibration holds
on the calibration set with the serving engine, and its graph is one static DAG with a dynamic
batch axis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import CPU, TEST_CATEGORY, TEST_INPUT_SIZE, _copy_version
from engine_fixtures import onnx_engine, test_set  # noqa: F401  (fixtures)
from models.manifest import MANIFEST, Manifest, ManifestError
from service.engines.factory import load_engine
from service.engines.onnxruntime import OnnxEngine


def test_manifest_round_trip(version_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(version_dir)
    manifest.verify_files(version_dir)
    manifest.write(tmp_path)
    again = Manifest.read(tmp_path)
    assert again == manifest
    assert again.model_dump_json() == manifest.model_dump_json()
    assert again.category == TEST_CATEGORY and again.input_size == TEST_INPUT_SIZE
    assert set(again.files) >= {"model.onnx"}

    raw = json.loads((version_dir / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**raw, "unexpected": 1}))
    with pytest.raises(ManifestError, match="not a valid manifest"):
        Manifest.read(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({**raw, "schema_version": 2}))
    with pytest.raises(ManifestError):
        Manifest.read(tmp_path)
    with pytest.raises(ManifestError, match="no manifest.json"):
        Manifest.read(tmp_path / "nowhere")


def test_tampered_model_is_refused_at_load(version_dir: Path, tmp_path: Path) -> None:
    flipped = _copy_version(version_dir, tmp_path / "flipped")
    onnx_path = flipped / "model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx.*sha256"):
        OnnxEngine(flipped, CPU)
    with pytest.raises(ManifestError, match=r"model\.onnx"):
        load_engine(flipped, kind="auto", device="cpu")

    truncated = _copy_version(version_dir, tmp_path / "truncated")
    onnx_path = truncated / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-100])
    with pytest.raises(ManifestError, match=r"model\.onnx.*truncated"):
        OnnxEngine(truncated, CPU)


def test_calibration_threshold_and_rates(version_dir: Path, trained_run: Path, onnx_engine, test_set) -> None:
    from models.data import folder_of_good_images
    from models.data_loading import load_images

    cal = Manifest.read(version_dir).calibration
    assert cal.normalise_score(cal.threshold) == 0.5
    assert cal.normalise_score(cal.threshold + 1e9) == 1.0 and cal.normalise_score(cal.threshold - 1e9) == 0.0

    # Calibrated on the data set's calibration/good (never trained on), with this very engine.
    assert cal.source is not None and cal.source.kind == "calibration_set" and cal.source.never_trained_on
    normals = folder_of_good_images(cal.source.path)
    scores, _ = onnx_engine.run(load_images(normals, TEST_INPUT_SIZE))
    assert cal.normal_scores.count == len(normals) == cal.source.count
    assert abs(float(scores.mean()) - cal.normal_scores.mean) < 1e-4
    flagged = float(np.mean([cal.normalise_score(float(s)) >= 0.5 for s in scores]))
    assert cal.method == "target_fpr" and cal.target_fpr == 0.01
    assert flagged == cal.fpr_calibration <= cal.target_fpr  # 1% of a dozen normals: none flagged
    assert 0.0 < cal.fpr_upper_95 < 0.5  # but the bound says how little a dozen normals prove

    images, labels = test_set
    test_scores, _ = onnx_engine.run(images)
    assert test_scores[labels == 1].mean() > test_scores[labels == 0].mean()
    assert test_scores[labels == 1].mean() > scores.mean()


def test_exported_graph_is_one_static_dag_with_dynamic_batch(version_dir: Path) -> None:
    import onnx

    from models.export import OUTPUTS

    model = onnx.load(str(version_dir / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Loop", "Scan", "If"}, ops
    assert not any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute)

    (inp,) = model.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == [TEST_INPUT_SIZE, TEST_INPUT_SIZE, 3]
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    for out in model.graph.output:
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert out.type.tensor_type.shape.dim[0].dim_param == dims[0].dim_param
