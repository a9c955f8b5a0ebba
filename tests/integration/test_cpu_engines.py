"""The CPU engines on the trained and exported fixture model (input 128): ONNX Runtime against
the PyTorch model, answers independent of the batch's composition, IO binding and session
options, inputs refused, the null engine only when asked for, and onnxruntime's session as the
host sees it (its pool threads' names, the providers that run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import CPU, TEST_INPUT_SIZE
from engine_fixtures import onnx_engine, test_set  # noqa: F401  (fixtures)
from service.engines.base import EngineError
from service.engines.factory import load_engine
from service.engines.onnxruntime import OnnxEngine


@pytest.fixture(scope="module")
def torch_engine(version_dir: Path):
    from service.engines.torch import TorchEngine

    return TorchEngine(version_dir, device="cpu")


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
