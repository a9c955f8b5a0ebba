"""Trainer, run format, evaluation and CLI on the real (small) demo data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.msflow import MSFlowConfig
from models.runs import LAST, load_model, read_checkpoint
from models.train import TrainConfig, train
TEST_CATEGORY = "brick"  # the category of the conftest fixtures


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss(trained_run: Path) -> None:
    nll = [e["train_nll"] for e in _log(trained_run) if "train_nll" in e]
    assert nll[-1] < 0.5 * nll[0]
    holdout = [e["holdout_nll"] for e in _log(trained_run) if "holdout_nll" in e]
    assert min(holdout) < holdout[0]


def test_holdout_images_are_not_trained_on(trained_run: Path, demo_root: Path) -> None:
    holdout = json.loads((trained_run / "holdout.json").read_text())
    start = next(e for e in _log(trained_run) if e.get("event") == "start")
    train_good = sorted((demo_root / TEST_CATEGORY / "train" / "good").glob("*.png"))
    assert len(holdout) == 8 and start["train_images"] == len(train_good) - len(holdout)
    assert all(Path(p).parent.name == "good" and Path(p).is_file() for p in holdout)


def test_selected_checkpoint_has_the_lowest_holdout_nll(trained_run: Path) -> None:
    best = min((e for e in _log(trained_run) if "holdout_nll" in e), key=lambda e: e["holdout_nll"])
    assert read_checkpoint(trained_run / "checkpoint.pt")["epoch"] == best["epoch"]


def test_resume_continues_from_the_last_meta_epoch(demo_root: Path, tmp_path: Path) -> None:
    common = dict(data=demo_root, category=TEST_CATEGORY, out=tmp_path / "run", model=MSFlowConfig(input_size=64),
                  lr=1e-3, sub_epochs=1, warmup_meta_epochs=0, decay_milestones=(), device="cpu")
    train(TrainConfig(meta_epochs=1, **common), progress=False)
    assert read_checkpoint(tmp_path / "run" / LAST)["epoch"] == 0
    train(TrainConfig(meta_epochs=2, **common), resume=True, progress=False)
    assert read_checkpoint(tmp_path / "run" / LAST)["epoch"] == 1
    starts = [e for e in _log(tmp_path / "run") if e.get("event") == "start"]
    assert [s["resume_from"] for s in starts] == [0, 1]


def test_run_round_trip_reproduces_the_model(trained_run: Path) -> None:
    a, _ = load_model(trained_run)
    b, info = load_model(trained_run)
    x = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(a(x)["anomaly_map"], b(x)["anomaly_map"])
    assert info["source"] == "train" and "flows" not in info


@pytest.fixture(scope="module")
def report(trained_run: Path) -> dict:
    from models.evaluate import evaluate_run

    return evaluate_run(trained_run, progress=False)


def test_eval_writes_report_and_pictures(report: dict, trained_run: Path) -> None:
    from models.runs import checkpoint_sha256

    on_disk = json.loads((trained_run / "report.json").read_text())
    assert on_disk["image_auroc"] == report["image_auroc"]
    assert on_disk["checkpoint_sha256"] == checkpoint_sha256(trained_run)  # what export takes it by
    for key in ("image_auroc", "pixel_auroc", "aupro", "best_f1"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["per_defect_type"]) == {"scratch", "stain", "hole", "foreign"}
    for picture in ("roc.png", "examples.png"):
        with Image.open(trained_run / picture) as im:
            assert im.width > 200 and im.height > 200


def test_eval_gives_tiers_and_verdicts_at_the_export_threshold(report: dict, trained_run: Path) -> None:
    assert set(report["per_tier"]) == {"visible", "subtle"}
    v = report["verdict"]
    assert v["threshold_source"]["calibration"]["kind"] == "calibration_set"  # never-trained-on normals
    assert v["good"]["n"] == 8 and v["defective"]["n"] == 8
    assert v["confusion"]["good"]["ok"] + v["confusion"]["good"]["ng"] == 8
    assert v["confusion"]["defective"]["ng"] == v["defective"]["detected"]
    assert sum(d["n"] for d in v["per_tier"].values()) == 8
    with Image.open(trained_run / "scores.png") as im:
        assert im.width > 200


def test_briefly_trained_model_already_ranks_visible_defects(report: dict) -> None:
    # 16 tiny sub-epochs at 128 px: visible defects already rank above good parts (the full
    # recipe's figures are in docs/RESULTS.md).
    assert report["per_tier"]["visible"]["image_auroc"] > 0.6


def test_cli_demo_data(tmp_path: Path) -> None:
    from msflow.cli import main

    assert main(["demo-data", "--out", str(tmp_path / "d"), "--n-train", "2", "--n-calibration", "3",
                 "--n-test-good", "1", "--n-test-defect", "8"]) == 0
    assert len(list((tmp_path / "d" / "gravel" / "test").glob("*/*.png"))) == 9
    assert len(list((tmp_path / "d" / "gravel" / "calibration" / "good").glob("*.png"))) == 3


def test_cli_refuses_settings_that_make_no_sense_in_one_line(demo_root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """They ended in tracebacks (ZeroDivisionError for --cond-channels 0), or were accepted
    (--blocks 0 0 0: a flow with no coupling blocks; --clamp -1)."""
    from msflow.cli import main

    base = ["train", "--data", str(demo_root), "--category", TEST_CATEGORY, "--out", str(tmp_path / "r")]
    for extra, says in ((["--input-size", "100"], "multiple of 32"), (["--cond-channels", "0"], "cond_channels"),
                        (["--blocks", "0", "0", "0"], "parallel_blocks"), (["--clamp", "-1"], "clamp")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("msflow train: ") and says in err and "Traceback" not in err, err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_eval_of_a_test_set_of_one_class_reports_what_is_undefined(trained_run: Path, demo_root: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The main metrics were null for a test set without defects, but the served score's AUROC
    raised, and the printout failed on a null: no report, a traceback."""
    from msflow.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = tmp_path / "data"
    shutil.copytree(demo_root, data, ignore=lambda folder, names: [
        n for n in names if Path(folder).name in ("test", "ground_truth") and n != "good"])
    assert main(["eval", "--run", str(run), "--data", str(data), "--category", TEST_CATEGORY]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["image_auroc"] is None and report["absolute"]["image_auroc"] is None
    assert "n/a" in capsys.readouterr().out or not report["per_defect_type"]


def test_eval_refuses_an_unreadable_calibration_image_before_predicting_the_test_set(
        trained_run: Path, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncated calibration/good image (the normals eval calibrates the verdict threshold
    on, as export does) was read only after the whole test set had been predicted: minutes on
    a real set, then the refusal and nothing written. It is read with the test set now."""
    import models.evaluate as evaluate
    from models.data import DataError

    data = tmp_path / "data"
    shutil.copytree(demo_root / TEST_CATEGORY, data / TEST_CATEGORY)
    bad = sorted((data / TEST_CATEGORY / "calibration" / "good").glob("*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:300])
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("report.json"))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(data)}))
    predicted: list[int] = []
    real_predict = evaluate.predict

    def counted(model: object, images: object, *args: object, **kwargs: object) -> object:
        predicted.append(len(images))  # type: ignore[arg-type]
        return real_predict(model, images, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate, "predict", counted)
    with pytest.raises(DataError, match=str(bad)):
        evaluate.evaluate_run(run, progress=False, pictures=False)
    assert predicted == [], f"predicted {predicted} images before the refusal"
    assert not (run / "report.json").exists()
