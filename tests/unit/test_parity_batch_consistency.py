"""``msflow.parity`` runs each engine on the images in batches and once more on the last image
alone, "answers must not depend on it" (the server runs batches of 1-2 under light load).
It measured the difference (``batch_consistency_max_abs``) and passed the engine whatever it
was. Here on a real ONNX graph whose answers depend on the batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")

from msflow.parity import check_parity  # noqa: E402
from tiny_onnx import tiny_onnx_version  # noqa: E402


def _run_with_holdout(root: Path, n: int = 6) -> Path:
    """A run folder whose held-out normals (``holdout.json``) are ``n`` different images."""
    run = root / "run"
    (run / "holdout").mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = run / "holdout" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (run / "holdout.json").write_text(json.dumps(paths))
    return run


def test_an_engine_whose_answer_depends_on_the_batch_fails_parity(tmp_path: Path) -> None:
    run = _run_with_holdout(tmp_path)
    version = tiny_onnx_version(tmp_path / "store", source_run=run, batch_dependent=True)
    report = check_parity(version, ["onnxruntime-cpu"], n_images=6, batch=3, explicit=True)
    entry = report["engines"]["onnxruntime-cpu"]
    assert entry["metrics"]["batch_consistency_max_abs"] > 0.01  # measured, far above float32 noise
    assert not report["passed"] and entry["status"] == "out_of_tolerance"
    assert any("in a batch of 1 differs" in f for f in entry["failures"])


def test_an_engine_that_answers_alike_in_any_batch_passes(tmp_path: Path) -> None:
    run = _run_with_holdout(tmp_path)
    version = tiny_onnx_version(tmp_path / "store", source_run=run)
    report = check_parity(version, ["onnxruntime-cpu"], n_images=6, batch=3, explicit=True)
    assert report["passed"], report["engines"]
    assert report["engines"]["onnxruntime-cpu"]["metrics"]["batch_consistency_max_abs"] == 0.0


@pytest.mark.parametrize("n_images, batch", [(7, 3), (6, 1)], ids=["last-batch-of-one", "batches-of-one"])
def test_the_check_runs_an_image_in_another_batch_than_before(tmp_path: Path, n_images: int, batch: int) -> None:
    """With 7 images in batches of 3 the last image had run alone already, and in batches of
    one every image had: "again alone" compared a batch of one with itself (0.0) and passed a
    graph whose answers move with the batch."""
    run = _run_with_holdout(tmp_path, n=n_images)
    version = tiny_onnx_version(tmp_path / "store", source_run=run, batch_dependent=True)
    report = check_parity(version, ["onnxruntime-cpu"], n_images=n_images, batch=batch, explicit=True)
    entry = report["engines"]["onnxruntime-cpu"]
    assert entry["metrics"]["batch_consistency_max_abs"] > 0.01
    assert not report["passed"] and entry["status"] == "out_of_tolerance"


def test_a_verdict_moving_between_review_and_ng_counts_as_a_flip() -> None:
    """The service answers ok, review or ng; parity counted flips of ok against the rest only,
    so an image the reference sends to review and the engine rejects outright was reported as
    0 flips. Near the ng bound, within the score tolerance, such a flip is explained (passes);
    it is counted either way."""
    from models.manifest import Calibration, ScoreStats
    from msflow.parity import compare

    stats = ScoreStats(count=10, mean=0.0, std=1.0, min=-1.0, p50=0.0, p95=1.0, p99=1.0, max=1.0)
    cal = Calibration(score_output="score", method="target_fpr", threshold=0.0, score_min=-0.5, score_max=0.5,
                      normal_scores=stats, map_low=0.0, map_high=1.0, pixel_threshold=0.5, ng_threshold=0.1)
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    ref = np.array([-0.3, 0.095, 0.3], dtype=np.float32)  # ok, review (just under the ng bound), ng
    got = np.array([-0.3, 0.105, 0.3], dtype=np.float32)  # the middle one now ng
    assert [cal.verdict(float(s)) for s in ref] == ["ok", "review", "ng"]
    result = compare((ref, maps), (got, maps), cal, "fp16")
    assert result["metrics"]["verdict_flips"] == 1
    assert result["passed"], result["failures"]
