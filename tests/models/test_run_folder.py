"""A run folder never mixes two runs: failed re-trains, fresh re-trains, --resume checks, stored paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from models.msflow import MSFlowConfig
from models.runs import CHECKPOINT, LAST, RunError, read_checkpoint
from models.train import TrainConfig, train

TEST_CATEGORY = "brick"  # the category of the conftest fixtures
EVAL_OUTPUTS = ("report.json", "test_scores.npz", "roc.png", "examples.png", "scores.png")


def _cfg(data: Path, out: Path, **over: object) -> TrainConfig:
    settings: dict = dict(data=data, category=TEST_CATEGORY, out=out, model=MSFlowConfig(input_size=64), lr=1e-3,
                          meta_epochs=1, sub_epochs=1, warmup_meta_epochs=0, decay_milestones=(), device="cpu")
    return TrainConfig(**{**settings, **over})


@pytest.fixture(scope="module")
def base_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run with (fake) eval outputs beside it, as `msflow eval` leaves them."""
    run = train(_cfg(demo_root, tmp_path_factory.mktemp("runs") / "base"), progress=False)
    for name in EVAL_OUTPUTS:
        (run / name).write_bytes(b"old eval output")
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_retrain_leaves_the_old_run_intact(run: Path, demo_root: Path, tmp_path: Path) -> None:
    before = _snapshot(run)
    with pytest.raises(ValueError):  # a bad learning rate: Adam refuses it
        train(_cfg(demo_root, run, lr=-1.0, model=MSFlowConfig(input_size=96)), progress=False)
    assert _snapshot(run) == before
    plain = tmp_path / "plain"
    shutil.copytree(demo_root / TEST_CATEGORY / "train" / "good", plain)
    (plain / "zz_broken.png").write_bytes(b"not a png")
    with pytest.raises(Exception):  # an unreadable image
        train(_cfg(plain, run, category=None), progress=False)
    assert _snapshot(run) == before


def test_fresh_retrain_replaces_the_previous_runs_outputs(run: Path, demo_root: Path) -> None:
    train(_cfg(demo_root, run, model=MSFlowConfig(input_size=96)), progress=False)
    assert not [name for name in EVAL_OUTPUTS if (run / name).exists()]
    assert read_checkpoint(run / CHECKPOINT)["config"]["input_size"] == 96
    assert read_checkpoint(run / LAST)["config"]["input_size"] == 96
    assert json.loads((run / "config.json").read_text())["model"]["input_size"] == 96
    starts = [line for line in (run / "train_log.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1  # the old run's log is gone, not appended to


@pytest.mark.parametrize(("change", "field"), [
    (dict(model=MSFlowConfig(input_size=96)), "model.input_size"),
    (dict(model=MSFlowConfig(input_size=64, parallel_blocks=(2, 2, 2))), "model.parallel_blocks"),
    (dict(lr=5e-4), "lr"),
])
def test_resume_refuses_changed_settings(run: Path, demo_root: Path, change: dict, field: str) -> None:
    before = _snapshot(run)
    with pytest.raises(RunError, match=rf"settings differ.*{field}"):
        train(_cfg(demo_root, run, meta_epochs=2, **change), resume=True, progress=False)
    assert _snapshot(run) == before


def test_resume_of_a_corrupt_last_checkpoint_is_a_run_error(run: Path, demo_root: Path) -> None:
    data = (run / LAST).read_bytes()
    (run / LAST).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="corrupt checkpoint"):
        train(_cfg(demo_root, run, meta_epochs=2), resume=True, progress=False)


def test_resume_without_last_checkpoint_is_a_run_error(run: Path, demo_root: Path) -> None:
    (run / LAST).unlink()
    with pytest.raises(RunError, match="cannot resume: no last.pt"):
        train(_cfg(demo_root, run, meta_epochs=2), resume=True, progress=False)


def test_run_stores_absolute_data_and_holdout_paths(demo_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo_root.parent)
    run = train(_cfg(Path(demo_root.name), tmp_path / "rel"), progress=False)
    monkeypatch.chdir(tmp_path)  # eval / export run from elsewhere
    cfg = json.loads((run / "config.json").read_text())
    assert Path(cfg["data"]).is_absolute() and Path(cfg["data"]) == demo_root.resolve()
    holdout = json.loads((run / "holdout.json").read_text())
    assert holdout and all(Path(p).is_absolute() and Path(p).is_file() for p in holdout)
    with Image.open(holdout[0]) as im:
        assert im.width > 0


def _no_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature extraction is the minutes a late failure wastes (WideResNet-50 at 512 px)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("extracted features before refusing")
    monkeypatch.setattr("models.train.extract_features", refuse)


@pytest.mark.parametrize("where", ["file", "file/run"])
def test_an_out_that_is_or_lies_under_a_file_is_refused_before_the_features(
        where: str, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was found at the first write, after the features: "FileExistsError: [Errno 17] File
    exists: '/tmp/x/outfile'", naming neither --out nor what to do."""
    (tmp_path / "file").write_text("notes")
    _no_features(monkeypatch)
    with pytest.raises(NotADirectoryError, match=rf"--out {tmp_path / where}: {tmp_path / 'file'} is a file"):
        train(_cfg(demo_root, tmp_path / where), progress=False)
    assert (tmp_path / "file").read_text() == "notes"


def test_resume_with_fewer_meta_epochs_than_trained_is_refused(run: Path, demo_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming a 2-meta-epoch run with --meta-epochs 1 extracted the features, trained nothing,
    said "run written" and rewrote config.json to 1 meta-epoch beside 2 meta-epochs' weights."""
    train(_cfg(demo_root, run, meta_epochs=2), resume=True, progress=False)
    before = _snapshot(run)
    _no_features(monkeypatch)
    with pytest.raises(RunError, match="already trained 2 meta-epochs.*--meta-epochs 2 or more"):
        train(_cfg(demo_root, run, meta_epochs=1), resume=True, progress=False)
    assert _snapshot(run) == before


def test_export_takes_only_the_eval_report_of_the_weights_it_exports(run: Path) -> None:
    """A resume that selects new weights keeps `msflow eval`'s report.json of the old ones;
    export copied it, its metrics went into the new version's manifest and its pictures to the
    console (measured: a manifest with epoch 0's AUROC for epoch 2's checkpoint). Only a report
    of the same checkpoint (sha256) and category is taken; any other is named and left out."""
    from models.runs import checkpoint_sha256, eval_report

    ours = checkpoint_sha256(run)
    report, why = eval_report(run, ours, TEST_CATEGORY)  # the fixture's fake outputs: no JSON
    assert report is None and why is not None and "msflow eval" in why
    (run / "report.json").unlink()
    assert eval_report(run, ours, TEST_CATEGORY) == (None, None)
    (run / "report.json").write_text(json.dumps({"category": TEST_CATEGORY, "checkpoint_sha256": ours,
                                                 "image_auroc": 0.9}))
    report, why = eval_report(run, ours, TEST_CATEGORY)
    assert report is not None and report["image_auroc"] == 0.9 and why is None
    for stale, says in (({"checkpoint_sha256": "0" * 64}, "other weights"), ({"checkpoint_sha256": None}, "other weights"),
                        ({"category": "grass"}, "evaluates 'grass'")):
        (run / "report.json").write_text(json.dumps({"category": TEST_CATEGORY, "checkpoint_sha256": ours,
                                                     "image_auroc": 0.9, **stale}))
        report, why = eval_report(run, ours, TEST_CATEGORY)
        assert report is None and why is not None and says in why and "msflow eval" in why
