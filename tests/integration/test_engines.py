"""Runtime engines on the really trained and exported fixture model (input 128).

ONNX Runtime vs the PyTorch model, batch-composition invariance, the manifest contract
(round trip, tampered files refused), calibration, the shape of the exported graph, the
TensorRT compatibility rules (pure, so testable without a GPU), and `msflow bench`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.manifest import MANIFEST, Manifest, ManifestError, TensorRTInfo, file_entry
from service.engines.base import EngineError
from service.engines.factory import load_engine
from service.engines.onnxruntime import OnnxEngine
from service.engines.tensorrt import check_plan_compatible

TEST_CATEGORY = "brick"  # as in conftest.py (tests/ is not a package)
TEST_INPUT_SIZE = 128

CPU = ["CPUExecutionProvider"]
NO_GPU = "no CUDA GPU on this host: run deploy/gpu-check.sh on one"


# ------------------------------------------------------------------ fixtures

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


@pytest.fixture(scope="module")
def torch_engine(version_dir: Path):
    from service.engines.torch import TorchEngine

    return TorchEngine(version_dir, device="cpu")


def _copy_version(version_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared fixture version (never modify the original)."""
    dst = tmp_path / TEST_CATEGORY / version_dir.name
    shutil.copytree(version_dir, dst)
    return dst


def _rewrite_manifest(version_dir: Path, **update) -> Manifest:
    manifest = Manifest.read(version_dir).model_copy(update=update)
    manifest.write(version_dir)
    return manifest


# ------------------------------------------------------------------ parity and batching

@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_matches_pytorch_on_real_images(onnx_engine, torch_engine, test_set, batch: int) -> None:
    images, labels = test_set
    # A mix of normal and defective images in the batch of 4.
    idx = [0] if batch == 1 else [0, int(np.argmax(labels)), 1, len(labels) - 1]
    x = images[idx]
    scores, maps = onnx_engine.run(x)
    ref_scores, ref_maps = torch_engine.run(x)
    assert scores.shape == (batch,) and maps.shape == (batch, TEST_INPUT_SIZE, TEST_INPUT_SIZE)
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    assert np.abs(scores - ref_scores).max() < 1e-4
    assert np.abs(maps - ref_maps).max() < 1e-4


@pytest.mark.parametrize("engine_fixture", ["onnx_engine", "torch_engine"])
def test_answer_does_not_depend_on_batch_composition(request, engine_fixture: str, test_set) -> None:
    engine = request.getfixturevalue(engine_fixture)
    images, labels = test_set
    target = int(np.argmax(labels))  # a defective image
    others = [i for i in range(len(images)) if i != target][:3]
    alone_s, alone_m = engine.run(images[[target]])
    for position in (0, 2, 3):
        idx = others[:position] + [target] + others[position:]
        s, m = engine.run(images[idx])
        np.testing.assert_allclose(s[position], alone_s[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m[position], alone_m[0], rtol=1e-5, atol=1e-5)


def test_io_binding_and_session_options_give_the_same_answers(version_dir: Path, onnx_engine, test_set) -> None:
    images, _ = test_set
    x = images[:3]
    ref_s, ref_m = onnx_engine.run(x)
    bound = OnnxEngine(version_dir, CPU, io_binding=True)  # the CUDA path's IO binding, on CPU
    s, m = bound.run(x)
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(m, ref_m)
    basic = OnnxEngine(version_dir, CPU, threads=1, optimization_level="basic")
    s, m = basic.run(x)
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, ref_m, rtol=1e-5, atol=1e-5)
    with pytest.raises(EngineError, match="optimization_level"):
        OnnxEngine(version_dir, CPU, optimization_level="max")


def test_engine_rejects_wrong_inputs(onnx_engine, test_set) -> None:
    images, _ = test_set
    with pytest.raises(EngineError, match="uint8"):
        onnx_engine.run(images[:1].astype(np.float32))
    with pytest.raises(EngineError, match="uint8"):
        onnx_engine.run(images[:1, :64, :64])
    with pytest.raises(EngineError, match="batch of 65"):
        onnx_engine.run(np.zeros((65, TEST_INPUT_SIZE, TEST_INPUT_SIZE, 3), np.uint8))


# ------------------------------------------------------------------ manifest

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


# ------------------------------------------------------------------ calibration

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


# ------------------------------------------------------------------ the exported graph

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


# ------------------------------------------------------------------ TensorRT

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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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


# ------------------------------------------------------------------ torch engine

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


# ------------------------------------------------------------------ bench and parity tools

def test_msflow_bench_end_to_end(model_store: Path, tmp_path: Path, capsys) -> None:
    from msflow.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(model_store / TEST_CATEGORY), "--batch-sizes", "1", "2",
               "--repeats", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = {(r["engine"], r["batch"]): r for r in report["results"]}
    for engine in ("onnxruntime-cpu", "torch-cpu"):
        assert report["engines"][engine]["status"] == "ok"
        for batch in (1, 2):
            row = rows[(engine, batch)]
            assert row["images_per_s"] > 0 and row["latency_ms"]["p50"] > 0
            assert row["rss_peak_mib"] is not None and row["rss_peak_mib"] >= 0
    assert set(report["ratio_onnxruntime_cpu_over_torch_cpu"]) == {"1", "2"}
    assert report["model"]["input_size"] == TEST_INPUT_SIZE
    assert "held-out" in report["settings"]["input"]
    for key in ("cpu_model", "logical_cores", "torch", "onnxruntime"):
        assert report["machine"][key]
    printed = capsys.readouterr().out
    assert "onnxruntime-cpu" in printed and "ratio onnxruntime-cpu / torch-cpu" in printed


def test_parity_tool_on_cpu(model_store: Path, tmp_path: Path) -> None:
    from msflow.parity import main

    out = tmp_path / "parity.json"
    assert main(["--model", str(model_store / TEST_CATEGORY), "--out", str(out), "--images", "6",
                 "--batch", "4"]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and report["engines"]["torch-cpu"]["passed"]
    assert report["images"]["count"] == 6 and "good" in report["images"]["labels"]
    if not _has_cuda():
        assert report["engines"]["tensorrt"]["status"] == "skipped"


def test_null_engine_only_when_asked_for(version_dir: Path) -> None:
    """The benchmark engine: zero outputs of the right shapes, at no cost; "auto" never picks it."""
    null = load_engine(version_dir, "null", max_batch_size=4)
    assert null.name == "null" and load_engine(version_dir, "auto", device="cpu").name != "null"
    size = null.manifest.input_size
    scores, maps = null.run(np.zeros((3, size, size, 3), dtype=np.uint8))
    assert scores.shape == (3,) and maps.shape == (3, size, size) and maps.dtype == np.float32
    assert not scores.any() and not maps.any() and not maps.flags.writeable
    with pytest.raises(EngineError):
        null.run(np.zeros((5, size, size, 3), dtype=np.uint8))  # the batch bound holds as for any engine


def test_onnxruntime_pool_threads_carry_the_engine_name(version_dir: Path) -> None:
    """top -H (and loadtests/frontend.py's split of the server's CPU) tell an engine's threads
    by name: onnxruntime's intra-op pool starts while the engine is built, under
    ``engine-<category>``; the building thread gets its own name back."""
    import threading

    from service.os_names import task_names

    before = task_names()
    engine = load_engine(version_dir, "onnx", device="cpu", threads=2)
    started = {tid: name for tid, name in task_names().items() if tid not in before}
    assert started and set(started.values()) == {f"engine-{engine.manifest.category}"}
    assert task_names()[threading.get_native_id()] == before[threading.get_native_id()]


def test_onnx_engine_names_the_provider_that_runs_and_makes_no_tensorrt_cache_without_it(
        version_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a host without TensorRT's provider nothing of its options applies (no cache folder is
    made), and the engine says which providers run (session.get_providers())."""
    import logging

    cache = tmp_path / "ort-tensorrt"
    with caplog.at_level(logging.INFO, logger="service.engines.onnxruntime"):
        engine = load_engine(version_dir, "onnx", device="auto", tensorrt_cache_dir=cache)
    assert engine.providers == engine.session.get_providers() == ["CPUExecutionProvider"]
    assert engine.name == "onnxruntime-cpu"
    assert not cache.exists()
    assert "onnxruntime runs on CPUExecutionProvider" in caplog.text and "could not start" not in caplog.text
