"""What an export may write into the model store: one number per version however many
writers race, folders a server of another user can read, and thresholds only from enough
finite scores of normals the run never trained on."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from models.calibrate import MIN_CALIBRATION_NORMALS, calibrate, calibration_samples
from models.manifest import MANIFEST, ScoreStats, list_versions
from models.publish import next_version, publish_version

CATEGORY = "brick"  # tests/conftest.py's demo data set (TEST_CATEGORY)


def _publish_one(category_dir: str) -> str:
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=category_dir))

    def name_it(version: str) -> None:
        (staging / MANIFEST).write_text(json.dumps({"version": version}))

    return publish_version(Path(category_dir), staging, None, name_it).name


def test_writers_racing_for_a_number_each_get_their_own(tmp_path: Path) -> None:
    """Two exports at once both chose the next number, and the second failed at its rename
    after all its work (measured: ENOTEMPTY)."""
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        versions = pool.map(_publish_one, [str(tmp_path)] * 24)
    assert sorted(versions, key=int) == [str(i) for i in range(1, 25)]
    assert list_versions(tmp_path) == [str(i) for i in range(1, 25)]
    for version in versions:  # each folder names its own number
        assert json.loads((tmp_path / version / MANIFEST).read_text())["version"] == version
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]


def test_a_published_version_is_readable_by_other_users(tmp_path: Path) -> None:
    """mkdtemp makes its folder 0700: a server running as another user could not read it."""
    path = Path(_publish_one(str(tmp_path)))
    mode = stat.S_IMODE((tmp_path / path).stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)


def test_odd_folder_names_neither_stop_the_listing_nor_take_a_number(tmp_path: Path) -> None:
    """``str.isdigit`` takes "1²" for a number, which ``int`` then refuses: the store watch
    died on such a folder."""
    for name in ("2", "10", "1²", "v3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text("{}")
    assert list_versions(tmp_path) == ["2", "10", "1²", "v3"]
    assert next_version(tmp_path) == "11"
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=tmp_path))
    with pytest.raises(ValueError, match="version"):
        publish_version(tmp_path, staging, "../escape", lambda _: None)


def test_a_threshold_needs_enough_finite_normal_scores() -> None:
    maps = np.zeros((MIN_CALIBRATION_NORMALS, 4, 4))
    normals = np.linspace(1.0, 2.0, MIN_CALIBRATION_NORMALS)
    assert calibrate(normals, maps, "image_score_log").threshold > 2.0
    with pytest.raises(ValueError, match="at least"):
        calibrate(normals[:-1], maps[:-1], "image_score_log")
    for broken in (np.nan, np.inf):
        scores = normals.copy()
        scores[3] = broken
        with pytest.raises(ValueError, match="not finite"):
            calibrate(scores, maps, "image_score_log")
    bad_maps = maps.copy()
    bad_maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="normal maps are not finite"):
        calibrate(normals, bad_maps, "image_score_log")
    with pytest.raises(ValidationError):  # a manifest could hold none: written as null, unreadable
        ScoreStats(count=1, mean=float("nan"), std=0.0, min=0.0, p50=0.0, p95=0.0, p99=0.0, max=0.0)


def test_calibration_images_the_run_trained_on_are_refused(demo_root: Path, tmp_path: Path) -> None:
    """Such images were recorded as never trained on, and the threshold set on them was too
    low a bar for new parts."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(demo_root), "category": CATEGORY}))
    train = sorted((demo_root / CATEGORY / "train" / "good").glob("*.png"))
    fresh = sorted((demo_root / CATEGORY / "calibration" / "good").glob("*.png"))
    folder = tmp_path / "cal"
    folder.mkdir()
    for path in fresh:
        shutil.copy(path, folder / path.name)
    samples, source = calibration_samples(run, folder)
    assert len(samples) == len(fresh) and source.never_trained_on
    shutil.copy(train[0], folder / "from-training.png")
    with pytest.raises(ValueError, match=f"1 of the {len(fresh) + 1} calibration images"):
        calibration_samples(run, folder)
    # A held-out image was never trained on: calibrating on it is allowed.
    (run / "holdout.json").write_text(json.dumps([str(train[0])]))
    assert len(calibration_samples(run, folder)[0]) == len(fresh) + 1


def test_too_few_calibration_normals_are_named_before_the_model_is_exported(
        demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was found by calibrate(), after the ONNX export, parity check and scoring: "calibration
    needs at least 10 normal images ..., got 5", naming neither the folder nor what to do."""
    from models.export import export_run

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded the model before counting the calibration normals")
    monkeypatch.setattr("models.export.load_model", refuse)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(demo_root), "category": CATEGORY}))
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((demo_root / CATEGORY / "calibration" / "good").glob("*.png"))[:5]:
        shutil.copy(path, few / path.name)
    with pytest.raises(ValueError, match=rf"at least {MIN_CALIBRATION_NORMALS} .* {few} holds 5: add"):
        export_run(run, tmp_path / "store", calibration_images=few)
    assert not (tmp_path / "store").exists()


def _run_holding_out_three(tmp_path: Path, demo_root: Path) -> Path:
    """A run trained on a plain folder, its holdout three images: too few to calibrate on."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(demo_root / CATEGORY / "train" / "good")}))
    held = sorted((demo_root / CATEGORY / "train" / "good").glob("*.png"))[:3]
    (run / "holdout.json").write_text(json.dumps([str(p) for p in held]))
    return run


def test_too_few_holdout_normals_say_how_to_get_more(tmp_path: Path, demo_root: Path) -> None:
    with pytest.raises(ValueError, match="training holdout holds 3.*calibration/good.*--calibration-images"):
        calibration_samples(_run_holding_out_three(tmp_path, demo_root))


def test_calibration_images_with_the_same_bytes_count_once(demo_root: Path, tmp_path: Path) -> None:
    """One photograph copied under ten names passed as ten normals: the manifest said 10 normals,
    0 flagged, false-alarm bound 26%, for a threshold set on one part (just above its score).
    Copies are left out with a warning; too few distinct ones left are refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(demo_root), "category": CATEGORY}))
    fresh = sorted((demo_root / CATEGORY / "calibration" / "good").glob("*.png"))
    folder = tmp_path / "cal"
    folder.mkdir()
    for i in range(MIN_CALIBRATION_NORMALS):
        shutil.copy(fresh[0], folder / f"copy{i:02d}.png")
    with pytest.raises(ValueError, match=rf"at least {MIN_CALIBRATION_NORMALS} .* 9 are copies of others "
                                         rf"\({folder / 'copy01.png'} \(= {folder / 'copy00.png'}\)"):
        calibration_samples(run, folder)
    for path in fresh:
        shutil.copy(path, folder / path.name)
    for i in range(1, MIN_CALIBRATION_NORMALS):
        (folder / f"copy{i:02d}.png").unlink()
    with pytest.warns(UserWarning, match="1 image.* left out"):  # one copy among distinct normals: counted once
        kept, source = calibration_samples(run, folder)
    assert len(kept) == source.count == len(fresh)
    digest = source.digest
    (folder / "copy00.png").unlink()
    kept, source = calibration_samples(run, folder)
    assert len(kept) == source.count == len(fresh) and source.digest == digest


def test_eval_without_enough_normals_names_its_own_ways_to_a_threshold(tmp_path: Path, demo_root: Path) -> None:
    """msflow eval refused with export's remedies only, while --threshold or --version work there."""
    from models.evaluate import _calibration_normals

    with pytest.raises(ValueError, match="training holdout holds 3.*msflow eval --threshold RAW, or --version"):
        _calibration_normals(_run_holding_out_three(tmp_path, demo_root), 64)
