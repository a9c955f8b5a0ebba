"""ONNX Runtime's TensorRT provider options for an exported version, checked on any host.

Without ``trt_profile_{min,opt,max}_shapes`` the TensorRT provider sizes its engine on the
first batch it sees and builds it again whenever a batch falls outside what it has seen
(warm-up at 8, then 1, then ...), minutes each on a GPU, and without its engine cache it
builds at every start. The options are a pure function of the model and the settings, so
what a GPU host would be given is tested here; that the provider honours them needs a GPU
(deploy/gpu-check.sh's host).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from service.engines.onnxruntime import (
    TENSORRT_PROVIDER,
    budget_tensorrt_cache,
    default_tensorrt_cache_dir,
    prepare_tensorrt_cache,
    tensorrt_provider_options,
    with_tensorrt_options,
)
from service.engines.ort_cache import DEFAULT_MAX_BYTES, hold_model_folder

SHA = "ab" * 32


def test_the_profile_covers_every_batch_the_engine_takes_at_the_models_size(tmp_path: Path) -> None:
    options = tensorrt_provider_options(input_size=256, max_batch_size=8, cache_dir=tmp_path, model_sha256=SHA)
    assert options["trt_profile_min_shapes"] == "images:1x256x256x3"
    assert options["trt_profile_opt_shapes"] == "images:8x256x256x3"  # the batcher's full batch
    assert options["trt_profile_max_shapes"] == "images:8x256x256x3"  # check_batch refuses more
    other = tensorrt_provider_options(input_size=128, max_batch_size=32, cache_dir=tmp_path, model_sha256=SHA)
    assert other["trt_profile_max_shapes"] == "images:32x128x128x3"


def test_fp16_as_the_plan_with_the_squared_latents_kept_in_fp32(tmp_path: Path) -> None:
    options = tensorrt_provider_options(input_size=64, max_batch_size=4, cache_dir=tmp_path, model_sha256=SHA)
    assert options["trt_fp16_enable"] is True
    # Pow -> Reduce (the graph's (z**2).mean) in FP32, as models/tensorrt_build.keep_numerics_in_fp32 does.
    assert options["trt_layer_norm_fp32_fallback"] is True


def test_engines_are_cached_per_model_content_and_timings_shared(tmp_path: Path) -> None:
    """ONNX Runtime names a cached engine after the model's FILE NAME and graph structure, not
    its weights: every version is a model.onnx of the same graph, so one shared folder would
    hand one model's engine to another. A folder per model sha256 keeps them apart."""
    a = tensorrt_provider_options(input_size=64, max_batch_size=4, cache_dir=tmp_path, model_sha256=SHA)
    b = tensorrt_provider_options(input_size=64, max_batch_size=4, cache_dir=tmp_path, model_sha256="cd" * 32)
    assert a["trt_engine_cache_enable"] is True and a["trt_timing_cache_enable"] is True
    assert a["trt_engine_cache_path"] == str(tmp_path / SHA)
    assert a["trt_engine_cache_path"] != b["trt_engine_cache_path"]
    assert a["trt_timing_cache_path"] == b["trt_timing_cache_path"] == str(tmp_path)


def test_no_cache_folder_means_no_cache_options() -> None:
    options = tensorrt_provider_options(input_size=64, max_batch_size=4, cache_dir=None, model_sha256=SHA)
    assert not any(key.startswith(("trt_engine_cache", "trt_timing_cache")) for key in options)
    assert options["trt_profile_max_shapes"] == "images:4x64x64x3"


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        tensorrt_provider_options(input_size=64, max_batch_size=0, cache_dir=tmp_path, model_sha256=SHA)
    with pytest.raises(ValueError):
        tensorrt_provider_options(input_size=0, max_batch_size=4, cache_dir=tmp_path, model_sha256=SHA)


def test_options_merge_into_the_provider_list_keeping_the_callers() -> None:
    trt = {"trt_fp16_enable": True, "device_id": 0}
    merged = with_tensorrt_options(
        [(TENSORRT_PROVIDER, {"device_id": 1}), ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"],
        trt)
    assert merged[0] == (TENSORRT_PROVIDER, {"trt_fp16_enable": True, "device_id": 1})  # cuda:1 stays
    assert merged[1:] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert with_tensorrt_options([TENSORRT_PROVIDER, "CPUExecutionProvider"], trt) == [
        (TENSORRT_PROVIDER, trt), "CPUExecutionProvider"]
    assert with_tensorrt_options(["CPUExecutionProvider"], trt) == ["CPUExecutionProvider"]


def test_the_cache_folder_is_made_private_and_a_foreign_default_refused(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache" / "ort"
    assert prepare_tensorrt_cache(root, SHA) == root
    assert (root / SHA).is_dir() and stat.S_IMODE(root.stat().st_mode) & 0o077 == 0

    # The default lives in the shared temp folder: another user's folder of that name (engines
    # planted for this server to load) is not used.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    default = default_tensorrt_cache_dir()
    assert default.parent == tmp_path and str(os.geteuid()) in default.name
    default.parent.mkdir(exist_ok=True)
    default.symlink_to(root)  # not this user's own folder
    assert prepare_tensorrt_cache(None, SHA) is None


def test_an_unwritable_folder_gives_no_cache_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert prepare_tensorrt_cache(blocker / "cache", SHA) is None


def test_a_model_the_cache_budget_cannot_hold_is_served_uncached_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The models in use fill the budget: the next model gets no engine cache (its engine is
    built at every start) rather than the cache growing past its budget, and says so once."""
    import logging

    root = tmp_path / "cache"
    root.mkdir()
    serving = hold_model_folder(root, "cd" * 32)  # another model, in use
    (root / ("cd" * 32) / "engine").write_bytes(os.urandom(512 * 1024))
    with caplog.at_level(logging.WARNING, logger="service.engines.onnxruntime"):
        for _ in range(3):  # reloads of the same model
            assert budget_tensorrt_cache(root, SHA, max_bytes=768 * 1024, onnx_bytes=400 * 1024) is None
    warnings = [r for r in caplog.records if "served without an engine cache" in r.getMessage()]
    assert len(warnings) == 1 and SHA[:12] in warnings[0].getMessage()
    assert (root / ("cd" * 32) / "engine").is_file()
    serving.close()
    hold = budget_tensorrt_cache(root, SHA, max_bytes=768 * 1024, onnx_bytes=400 * 1024)
    assert hold is not None and not (root / ("cd" * 32)).exists()  # let go: pruned for room
    hold.close()


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_the_cache_budget_stays_well_under_the_tmp_volume_the_kubelet_enforces() -> None:
    """Past its emptyDir's sizeLimit the kubelet evicts the pod: the budget, by default and as
    deployed, leaves half of /tmp to everything else written there."""
    yaml = pytest.importorskip("yaml")
    from service.config import Settings

    root = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
    assert Settings.model_fields["ort_tensorrt_cache_max_bytes"].default == DEFAULT_MAX_BYTES
    deployed = int(yaml.safe_load((root / "configmap.yaml").read_text())["data"]["MSFLOW_ORT_TENSORRT_CACHE_MAX_BYTES"])
    for manifest in ("api-deployment.yaml", "worker-deployment.yaml"):
        spec = yaml.safe_load((root / manifest).read_text())["spec"]["template"]["spec"]
        tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")
        limit = _quantity_bytes(tmp["emptyDir"]["sizeLimit"])
        assert DEFAULT_MAX_BYTES <= limit // 2 and deployed <= limit // 2, manifest


def test_a_default_folder_others_may_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default folder, this user's own but writable by others (made before with umask 0, or
    chmod'ed): anyone could plant an engine under ``<model sha256>/`` (the digest is in the
    store's manifest) for this server to load. It was used as it was; now it is refused, as a
    folder of another owner is."""
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    default = default_tensorrt_cache_dir()
    default.mkdir()
    default.chmod(0o777)
    assert prepare_tensorrt_cache(None, SHA) is None
    assert not (default / SHA).exists()
    default.chmod(0o700)
    assert prepare_tensorrt_cache(None, SHA) == default
