"""Operator-confirmed OK parts growing the normal set: ``msflow train --include-reviewed-ok``
on the real demo data, the count in the run's config and the exported manifest, and
``msflow recalibrate`` leaving the parts a version trained on out of its known goods."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.manifest import Manifest
from models.review_store import REVIEWED_OK, Budget, ReviewStore
from msflow.cli import main

CATEGORY = "brick"


def line_part(path: Path) -> bytes:
    """A demo image turned into a part the data set does not hold (mirrored): the data set's
    own images are no new normals (test_ok_labels_of_images_the_data_set_holds_...)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, "PNG")
    return out.getvalue()


def fields(verdict: str, raw: float) -> dict[str, object]:
    return {"reason": "review", "model_version": "0", "verdict": verdict, "is_anomalous": verdict != "ok",
            "raw_score": raw, "score": 0.5, "threshold": 1.0, "ng_threshold": 2.0}


@pytest.mark.slow
def test_reviewed_ok_images_join_the_training_normals(demo_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_store = tmp_path / "model_store"
    review = ReviewStore(model_store / ".review", Budget(10**9, 1000, 86_400.0, 86_400.0))
    line_parts = sorted((demo_root / CATEGORY / "test" / "good").glob("*.png"))[:4]
    defect = sorted((demo_root / CATEGORY / "test" / "hole").glob("*.png"))[0]
    ids = [review.add(CATEGORY, fields("review", 1.5), image, "PNG", (128, 128), None, None)[1]
           for image in [*map(line_part, line_parts), defect.read_bytes()]]
    for item_id in ids[:3]:
        review.label(CATEGORY, item_id, "ok", by="alice")
    review.label(CATEGORY, ids[4], "ng", by="alice", defect_type="hole")  # ids[3] stays pending
    review.add("grass", fields("review", 1.5), line_part(line_parts[3]), "PNG", (128, 128), None, None)

    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_root), "--category", CATEGORY, "--out", str(run), "--input-size", "64",
                 "--meta-epochs", "1", "--sub-epochs", "1", "--warmup-meta-epochs", "0", "--decay-milestones",
                 "--device", "cpu", "--holdout-fraction", "0.25", "--include-reviewed-ok", str(model_store)]) == 0
    assert "include 3 operator-confirmed OK image(s)" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["reviewed_ok_images"] == 3 and config["include_reviewed_ok"] == str(model_store)
    start = next(json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"start"' in line)
    train_good = len(list((demo_root / CATEGORY / "train" / "good").glob("*.png")))
    holdout = json.loads((run / "holdout.json").read_text())
    assert start["train_images"] == train_good - len(holdout) + 3 and start["reviewed_ok_images"] == 3
    assert all("/train/good/" in p for p in holdout)  # reviewed parts train; the holdout stays the data set's
    rows = json.loads((run / REVIEWED_OK).read_text())
    assert sorted(r["id"] for r in rows) == sorted(ids[:3])

    from models.export import export_run

    version_dir = export_run(run, model_store)
    manifest = Manifest.read(version_dir)
    assert manifest.training is not None and manifest.training.reviewed_ok_images == 3
    assert manifest.training.train_images == start["train_images"] and REVIEWED_OK in manifest.files

    # recalibrating this version: the 3 OK parts it trained on are not known goods for it
    from models.recalibrate import recalibrate

    lines: list[str] = []
    new_dir, report = recalibrate(model_store, CATEGORY, out=lines.append, warn=lines.append,
                                  accept_small_sample=True)  # one NG label: accepted, as said below
    assert report.excluded_trained_on == 3 and report.labelled_ok == 0 and report.labelled_ng == 1
    assert report.rescored == 1  # scored by another version ("0"): scored again by this one
    assert Manifest.read(new_dir).calibration.labels.excluded_trained_on == 3
    # the same engine files, so the same source checkpoint (the torch engine checks it)
    assert manifest.source_checkpoint_sha256 is not None
    assert Manifest.read(new_dir).source_checkpoint_sha256 == manifest.source_checkpoint_sha256
    assert any("too small" in line for line in lines)
    shutil.rmtree(model_store)


def test_an_ok_label_whose_image_is_gone_is_left_out_and_said(demo_root: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """ReviewStore.labelled leaves out an item whose image file is gone (4d0473d): recalibrate
    names it, but `train --include-reviewed-ok` trained on one part fewer without a word."""
    import logging

    from models.train import TrainConfig, reviewed_ok_samples

    store = tmp_path / "review"
    review = ReviewStore(store, Budget(10**9, 1000, 86_400.0, 86_400.0))
    parts = sorted((demo_root / CATEGORY / "test" / "good").glob("*.png"))[:2]
    ids = [review.add(CATEGORY, fields("review", 1.5), line_part(p), "PNG", (128, 128), None, None)[1]
           for p in parts]
    for item_id in ids:
        review.label(CATEGORY, item_id, "ok", by="alice")
    review.file(CATEGORY, ids[1], "image")[0].unlink()
    cfg = TrainConfig(data=demo_root, category=CATEGORY, out=tmp_path / "run", include_reviewed_ok=store)
    with caplog.at_level(logging.WARNING, logger="models.train"):
        samples = reviewed_ok_samples(cfg)
    assert [row["id"] for row, _ in samples] == [ids[0]]
    assert [r.getMessage() for r in caplog.records] == [
        f"1 operator-confirmed OK item(s) of {CATEGORY} left out: their image or item.json is gone ({ids[1]})"]


def test_a_folder_that_is_no_review_store_is_refused(demo_root: Path, tmp_path: Path) -> None:
    """`--include-reviewed-ok` given the model store while the server keeps its review store
    elsewhere (MSFLOW_REVIEW_STORE), or the unpacked label export, trained the whole run
    with "include 0 operator-confirmed OK image(s)": a folder holding no review items of the
    category and no store lock is not a review store, and is refused before training."""
    from models.train import TrainConfig, reviewed_ok_samples

    model_store = tmp_path / "model_store"
    (model_store / CATEGORY / "1").mkdir(parents=True)
    export = tmp_path / "export"
    (export / "good").mkdir(parents=True)
    (export / "labels.jsonl").write_text("")
    for folder in (model_store, export):
        cfg = TrainConfig(data=demo_root, category=CATEGORY, out=tmp_path / "run", include_reviewed_ok=folder)
        with pytest.raises(ValueError, match=f"{folder} is not a review store: it holds no review items of "
                                             f"{CATEGORY}"):
            reviewed_ok_samples(cfg)

    review = ReviewStore(tmp_path / "review", Budget(10**9, 1000, 86_400.0, 86_400.0))
    review.prune()  # what a server does at start: a store with no item of the category yet
    cfg = TrainConfig(data=demo_root, category=CATEGORY, out=tmp_path / "run", include_reviewed_ok=review.root)
    assert reviewed_ok_samples(cfg) == []


def test_ok_labels_of_images_the_data_set_holds_are_left_out_and_said(
        demo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Parts a smoke test sent from the data set itself, audited and labelled OK, were taken
    in as new normals (measured: a holdout image, a calibration image and a test good of the
    demo): the holdout that selects the model then held an image it trained on, `msflow eval`
    scored a test image the flows fit, and `msflow export` refused the finished run ("1 of the
    12 calibration images ... are images the run trained on"). Each is left out now, named."""
    import logging

    from models.data import MVTecCategory
    from models.train import TrainConfig, reviewed_ok_samples

    data = MVTecCategory(demo_root, CATEGORY)
    from_data = [data.train_samples()[0].path, data.calibration_samples()[0].path, data.test_samples()[0].path]
    review = ReviewStore(tmp_path / "review", Budget(10**9, 1000, 86_400.0, 86_400.0))
    ids = [review.add(CATEGORY, fields("review", 1.5), image, "PNG", (128, 128), None, None)[1]
           for image in [p.read_bytes() for p in from_data] + [line_part(from_data[2])]]
    for item_id in ids:
        review.label(CATEGORY, item_id, "ok", by="alice")
    cfg = TrainConfig(data=demo_root, category=CATEGORY, out=tmp_path / "run", include_reviewed_ok=review.root)
    with caplog.at_level(logging.WARNING, logger="models.train"):
        samples = reviewed_ok_samples(cfg)
    assert [row["id"] for row, _ in samples] == [ids[3]]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "3 operator-confirmed OK image(s) of brick left out: the data set holds them" in said[0]
    assert all(item_id in said[0] for item_id in ids[:3]) and str(from_data[1]) in said[0]
