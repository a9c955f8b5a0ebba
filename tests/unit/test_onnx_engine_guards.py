"""The ONNX Runtime engine over a real, hand-made ONNX graph (no trained model needed:
:func:`tiny_onnx.tiny_onnx_version`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models.manifest import sha256_file  # noqa: E402
from service.engines.onnxruntime import TENSORRT_PROVIDER, OnnxEngine  # noqa: E402
from tiny_onnx import tiny_onnx_version  # noqa: E402


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


@pytest.mark.parametrize("elsewhere", ["../1/model.onnx", "ABSOLUTE"])
def test_a_manifest_naming_a_model_outside_its_folder_is_refused(tmp_path: Path, elsewhere: str) -> None:
    """Version 2's manifest named version 1's model (``../1/model.onnx``, or its absolute path)
    with that file's digest: it verified, and version 2 served version 1's model until version
    1 was deleted, then failed to load. A manifest names files of its own folder only."""
    from models.manifest import Manifest, ManifestError, file_entry

    v1 = tiny_onnx_version(tmp_path / "store", version="1")
    v2 = tiny_onnx_version(tmp_path / "store", version="2")
    (v2 / "model.onnx").unlink()
    name = str(v1 / "model.onnx") if elsewhere == "ABSOLUTE" else elsewhere
    manifest = Manifest.read(v2)
    manifest.model_copy(update={"onnx": manifest.onnx.model_copy(update={"file": name}),
                                "files": {name: file_entry(v1 / "model.onnx")}}).write(v2)
    with pytest.raises(ManifestError, match="pattern"):
        OnnxEngine(v2)


def test_a_model_replaced_between_its_check_and_its_load_is_not_served(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine checked ``model.onnx``'s digest, then onnxruntime opened the path again: a
    copy landing in between (rsync renames each file in; a folder copied over a version) was
    served under the manifest, and calibration, of the model checked. Here a writer replaces
    the file right after the check: the engine refuses to build (the store watch tries the
    folder again once it changes) instead of serving the other model."""
    from models.manifest import Manifest

    version = tiny_onnx_version(tmp_path / "store")
    other = tiny_onnx_version(tmp_path / "other", batch_dependent=True) / "model.onnx"
    check = Manifest.verify_files

    def check_then_replace(self: Manifest, version_dir: str | Path, names: list[str] | None = None) -> None:
        check(self, version_dir, names)
        staged = Path(version_dir) / ".model.onnx.part"
        staged.write_bytes(other.read_bytes())
        staged.rename(Path(version_dir) / "model.onnx")  # as rsync lands a file

    monkeypatch.setattr(Manifest, "verify_files", check_then_replace)
    from service.engines.base import EngineError

    with pytest.raises(EngineError, match="changed while"):
        OnnxEngine(version)
