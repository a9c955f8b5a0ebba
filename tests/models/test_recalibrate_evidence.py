"""What ``msflow recalibrate`` counts as evidence, on the session's real exported version and
a real review store: each part once, and never a part the model trained on.

Measured on the tree before (the demo's 12 calibration normals, 8 good and 8 defective test
parts labelled):

- three normals (``--calibration-images`` of 3 images) were fitted on and reported (0/3 false
  alarms, a 95% bound of 63%) where ``msflow export`` refuses fewer than 10;
- the 12 normals and three copies of each were counted as 48: a false-alarm bound of 6.1%
  reported (and written into the manifest) where 12 parts support 22%;
- ``--calibration-images`` of the data set's train/good (the images the flows fit) was
  taken as 32 normals never seen, where export refuses them;
- the calibration normals labelled OK by an operator were counted twice as known goods
  (12 normals + 20 OK labels, 12 of them the same bytes); training images labelled OK were
  known goods too, with the optimistic scores of images the model fit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.recalibrate import Recalibration, RecalibrationError, recalibrate
from models.review_store import Budget, ReviewStore

CATEGORY = "brick"  # tests/conftest.py's demo category
FIELDS = {"reason": "review", "verdict": "review", "is_anomalous": False, "raw_score": 0.0, "score": 0.5,
          "threshold": 1.0, "ng_threshold": 2.0, "model_version": "0"}


@pytest.fixture
def store(model_store: Path, tmp_path: Path, demo_test_images: dict[str, list[Path]]) -> Path:
    """The session's version 1, every demo test part labelled (good ok, defective ng)."""
    out = tmp_path / "store"
    shutil.copytree(model_store, out, ignore=shutil.ignore_patterns(".review"))
    label(out, demo_test_images["good"], "ok")
    label(out, [p for kind, paths in demo_test_images.items() if kind != "good" for p in paths], "ng")
    return out


def label(store: Path, paths: list[Path], lab: str) -> None:
    review = ReviewStore(store / ".review", Budget(10**9, 10**6, 10**9, 10**9))
    for path in paths:
        result, item_id = review.add(CATEGORY, dict(FIELDS), path.read_bytes(), "PNG", (128, 128), None, None)
        assert result == "stored" and item_id is not None
        review.label(CATEGORY, item_id, lab, by="alice", defect_type="stain" if lab == "ng" else None)


def dry_run(store: Path, lines: list[str] | None = None, **options: Any) -> Recalibration:
    say = lines.append if lines is not None else (lambda _: None)
    version_dir, report = recalibrate(store, CATEGORY, out=say, warn=say, max_fpr=1.0, accept_small_sample=True,
                                      dry_run=True, **options)
    assert version_dir is None
    return report


def calibration_images(demo_root: Path) -> list[Path]:
    return sorted((demo_root / CATEGORY / "calibration" / "good").glob("*.png"))


def test_fewer_than_ten_normals_are_refused(store: Path, demo_root: Path, tmp_path: Path) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for path in calibration_images(demo_root)[:3]:
        shutil.copy(path, few / path.name)
    with pytest.raises(RecalibrationError, match="at least 10 .*3"):
        dry_run(store, calibration_images=few)


def test_copies_of_a_normal_count_once(store: Path, demo_root: Path, tmp_path: Path) -> None:
    copies = tmp_path / "copies"
    copies.mkdir()
    originals = calibration_images(demo_root)
    for path in originals:
        for k in range(4):
            shutil.copy(path, copies / f"{k}-{path.name}")
    lines: list[str] = []
    report = dry_run(store, lines, calibration_images=copies)
    assert report.normals == len(originals) == report.normals_after["n"] == 12
    assert report.normals_after["fpr_upper_95"] > 0.2  # what 12 parts support, not 48
    assert any("36 calibration image(s) with the same bytes as another left out" in w for w in report.warnings), lines


def test_normals_the_model_trained_on_are_refused(store: Path, demo_root: Path) -> None:
    with pytest.raises(RecalibrationError, match="trained on"):
        dry_run(store, calibration_images=demo_root / CATEGORY / "train" / "good")


def test_ok_labels_of_normals_and_of_training_images_are_not_more_known_goods(
        store: Path, demo_root: Path, trained_run: Path) -> None:
    label(store, calibration_images(demo_root), "ok")  # the 12 normals, labelled OK as well
    holdout = {str(Path(p).resolve()) for p in json.loads((trained_run / "holdout.json").read_text())}
    trained = [p for p in sorted((demo_root / CATEGORY / "train" / "good").glob("*.png"))
               if str(p.resolve()) not in holdout][:3]
    label(store, trained, "ok")
    lines: list[str] = []
    report = dry_run(store, lines)
    assert report.normals == 12
    assert report.labelled_ok == 8, lines  # the test goods only: each normal once, no image the flows fit
    assert report.excluded_trained_on == 3
    assert any("12 OK label(s) are calibration normals" in w for w in report.warnings), lines


def test_items_captured_before_the_version_existed_are_scored_again(
        model_store: Path, tmp_path: Path, demo_test_images: dict[str, list[Path]]) -> None:
    """An item names its version by number only, and a number is used again (a category
    deleted and exported again starts at 1): items the old version 1 scored kept their served
    scores, another model's scale (measured: all 16 fitted on raw 1000.0, none rescored). An
    item captured before the version was written cannot have been scored by it."""
    from datetime import timedelta

    from models.manifest import Manifest

    out = tmp_path / "store"
    shutil.copytree(model_store, out, ignore=shutil.ignore_patterns(".review"))
    before = Manifest.read(out / CATEGORY / "1").created_at - timedelta(days=1)
    review = ReviewStore(out / ".review", Budget(10**9, 10**6, 10**12, 10**12))
    parts = [(p, "ok") for p in demo_test_images["good"]] + [
        (p, "ng") for kind, paths in demo_test_images.items() if kind != "good" for p in paths]
    for i, (path, lab) in enumerate(parts):
        old = {**FIELDS, "model_version": "1", "raw_score": 1000.0}  # the old version 1's scale
        _, item_id = review.add(CATEGORY, old, path.read_bytes(), "PNG", (128, 128), None, None,
                                now=before + timedelta(seconds=i))
        assert item_id is not None
        review.label(CATEGORY, item_id, lab, by="alice", defect_type="stain" if lab == "ng" else None)
    report = dry_run(out)
    assert report.rescored == len(parts) == 16
    assert all(row["rescored"] and row["score"] != 1000.0 for row in report.labels_used)


def test_a_recalibration_holds_its_staging_folder_while_it_writes(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recalibration killed before it published (SIGTERM, the OOM killer) left its
    ``.recalibrate-*`` folder, hard links or copies of the model, for good: it was a plain
    mkdtemp, which the next publish cannot tell from a live writer's. It is now held as an
    export's is (models.publish.new_staging), so a later publish removes it once its writer
    is gone, and never while it writes."""
    import fcntl
    import os

    import models.recalibrate as recalibration
    from models.publish import STAGING_LOCK, remove_abandoned_staging

    real = recalibration.publish_version
    seen: list[Path] = []

    def publish(category_dir: Path, staging: Path, *args: Any) -> Path:
        seen.append(staging)
        fd = os.open(staging / STAGING_LOCK, os.O_RDWR)  # FileNotFoundError before: no hold at all
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its writer holds it
        finally:
            os.close(fd)
        assert remove_abandoned_staging(category_dir) == [] and staging.is_dir()
        return real(category_dir, staging, *args)

    monkeypatch.setattr(recalibration, "publish_version", publish)
    version_dir, _ = recalibrate(store, CATEGORY, out=lambda _: None, warn=lambda _: None, max_fpr=1.0,
                                 accept_small_sample=True)
    assert version_dir is not None and version_dir.is_dir() and len(seen) == 1
    assert not (version_dir / STAGING_LOCK).exists() and not seen[0].exists()
