"""What `msflow export` and `msflow recalibrate` check before they work, and what they record.

- export refuses a bad setting in the time it takes to read the run, before the ONNX export,
  and leaves no folder behind (not even an empty category);
- the category is the run's own or --category, never a folder name of the run's path;
- paths go into the manifest absolute, so the torch engine finds the run from anywhere, and a
  version exported with another --map-sigma serves;
- a second export of the same checkpoint calibrated the same way says which version it repeats;
- recalibrate refuses a new version whose false alarms on the calibration normals pass a
  ceiling (and --dry-run writes nothing), and a category that is no category name;
- recalibrate refuses, unless --accept-small-sample, a bound moved by fewer than 10 labels of
  a class (one NG label put the ng bound at that part's score), bound by bound and class by class.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import export as export_module
from models import recalibrate as recalibrate_module
from models.calibrate import fit_review_bounds
from models.data import Sample
from models.export import export_run
from models.manifest import Manifest, list_versions
from models.msflow import MSFlow, MSFlowConfig
from models.recalibrate import MIN_LABELS_PER_CLASS, RecalibrationError, recalibrate, small_sample_moves
from models.review_store import Budget, ReviewStore

CATEGORY = "brick"  # tests/conftest.py's demo category


class NoWork(Exception):
    """Raised by the ONNX exporter in tests that must fail or finish before any work."""


@pytest.fixture
def no_onnx(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def refuse(model: object, path: Path, *args: object, **kwargs: object) -> Path:
        calls.append(path)
        raise NoWork(path)

    monkeypatch.setattr(export_module, "export_onnx", refuse)
    return calls


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------ export: settings first

@pytest.mark.parametrize(("settings", "message"), [
    (dict(target_fpr=-1.0), "target-fpr must be in"),
    (dict(target_fpr=1.5), "target-fpr must be in"),
    (dict(target_fpr=float("nan")), "target-fpr must be in"),
    (dict(target_recall=1.5), "target-recall must be in"),
    (dict(policy="target_recall"), "needs --target-recall"),
    (dict(policy="target_recall", target_recall=0.9), "needs labelled anomalous images"),
    (dict(policy="f1_optimal"), "needs labelled anomalous images"),
    (dict(validation="/nonexistent/validation"), "folder not found"),
    (dict(calibration_images="/nonexistent/normals"), "folder not found"),
    (dict(map_sigma=-1.0), "map-sigma must be between 0 and 32"),
    (dict(map_sigma=33.0), "map-sigma must be between 0 and 32"),
    (dict(category="../evil"), "must match"),
    (dict(version="../escape"), "must match"),
])
def test_export_refuses_bad_settings_before_any_work(trained_run: Path, tmp_path: Path, no_onnx: list[Path],
                                                     settings: dict, message: str) -> None:
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=message):
        export_run(trained_run, store, **settings)
    assert not no_onnx  # refused before the graph was exported
    assert not store.exists()  # and nothing made: no empty category folder either


def test_a_failed_export_leaves_no_empty_category_folder(trained_run: Path, tmp_path: Path,
                                                         no_onnx: list[Path]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(NoWork):
        export_run(trained_run, store)
    assert no_onnx and _files(store) == []
    (store / CATEGORY / "keep").mkdir(parents=True)  # a category that was there stays, with what it holds
    with pytest.raises(NoWork):
        export_run(trained_run, store)
    assert _files(store) == [CATEGORY, f"{CATEGORY}/.lock", f"{CATEGORY}/keep"] or _files(store) == [
        CATEGORY, f"{CATEGORY}/keep"]


def test_the_category_is_the_runs_own_or_given(trained_run: Path, tmp_path: Path, no_onnx: list[Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A run without a category (imported, or trained on a plain folder) in a folder whose parent
    # looks like a category: never taken from the path.
    imported = tmp_path / "imports" / "off1"
    imported.mkdir(parents=True)
    (imported / "config.json").write_text(MSFlowConfig(input_size=64).model_dump_json())
    with pytest.raises(ValueError, match="records no category.*--category"):
        export_run(imported, tmp_path / "store")
    monkeypatch.chdir(imported.parent)
    with pytest.raises(ValueError, match="records no category"):
        export_run("off1", tmp_path / "store")  # relative: its parent's name is ''
    assert not no_onnx and not (tmp_path / "store").exists()
    assert export_module.run_category(imported, {}, "brick") == "brick"
    # A trained run's own category, whatever its folder's parent is called.
    moved = tmp_path / "elsewhere" / "somerun"
    shutil.copytree(trained_run, moved)
    with pytest.raises(NoWork):
        export_run(moved, tmp_path / "store")
    assert no_onnx and no_onnx[0].parent.parent == tmp_path / "store" / CATEGORY


def test_set_map_sigma_validates() -> None:
    model = MSFlow(MSFlowConfig(input_size=64))
    model.set_map_sigma(2)
    assert model.config.map_sigma == 2.0 and model.smoothing.numel() > 1
    for bad in (-1.0, 32.5, float("nan")):
        with pytest.raises(ValueError, match="map_sigma"):
            model.set_map_sigma(bad)
    assert model.config.map_sigma == 2.0


# ------------------------------------------------------------------ export: a real one, from relative paths

@pytest.fixture(scope="module")
def relative_export(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`msflow export --run <relative> --store <relative> --map-sigma 2` (the run's config has 4)."""
    from msflow.cli import main

    store = tmp_path_factory.mktemp("relative-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(trained_run.parent)
        assert main(["export", "--run", trained_run.name, "--store", os.path.relpath(store, trained_run.parent),
                     "--map-sigma", "2"]) == 0
    return store / CATEGORY / "1"


def test_export_records_absolute_paths(relative_export: Path, trained_run: Path) -> None:
    manifest = Manifest.read(relative_export)
    assert manifest.source_run == str(trained_run.resolve())
    assert manifest.model["map_sigma"] == 2.0
    assert Path(manifest.calibration.source.path).is_absolute()


def test_torch_engine_serves_a_relative_export_with_another_map_sigma(relative_export: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """From another working directory; the run's config says map_sigma 4, the version 2: the
    torch engine serves the version's (its maps match the exported graph's)."""
    from models.data import folder_of_good_images
    from models.data_loading import load_images
    from service.engines.onnxruntime import OnnxEngine
    from service.engines.torch import TorchEngine

    monkeypatch.chdir(tmp_path)
    manifest = Manifest.read(relative_export)
    images = load_images(folder_of_good_images(manifest.calibration.source.path)[:2], manifest.input_size)
    torch_scores, torch_maps = TorchEngine(relative_export, device="cpu").run(images)
    onnx_scores, onnx_maps = OnnxEngine(relative_export, ["CPUExecutionProvider"]).run(images)
    scale = max(1.0, float(np.abs(onnx_maps).max()))
    assert np.abs(torch_maps - onnx_maps).max() <= 1e-4 * scale
    assert np.allclose(torch_scores, onnx_scores, rtol=1e-4, atol=1e-4)


def test_a_second_export_of_the_same_checkpoint_says_which_version_it_repeats(
        relative_export: Path, trained_run: Path, demo_root: Path, tmp_path: Path, no_onnx: list[Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    from msflow.cli import main

    store = relative_export.parent.parent
    with pytest.warns(export_module.DuplicateExportWarning, match=r"version 1 of brick .* same checkpoint"):
        with pytest.raises(NoWork):  # warned before the work, which then goes on (here: stops)
            export_run(trained_run, store, map_sigma=2.0)
    with pytest.raises(NoWork):
        main(["export", "--run", str(trained_run), "--store", str(store), "--map-sigma", "2"])
    assert "msflow export: warning: version 1 of brick" in capsys.readouterr().err
    # Other calibration images, or another map smoothing: a legitimate new version, no warning.
    other = tmp_path / "normals"
    other.mkdir()
    for path in sorted((demo_root / CATEGORY / "calibration" / "good").glob("*.png"))[:-1]:
        shutil.copy(path, other / path.name)
    for settings in (dict(map_sigma=2.0, calibration_images=other), dict()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", export_module.DuplicateExportWarning)
            with pytest.raises(NoWork):
                export_run(trained_run, store, **settings)
    assert list_versions(store / CATEGORY) == ["1"]


# ------------------------------------------------------------------ recalibrate

def _label(store: Path, paths: list[Path], label: str) -> None:
    review = ReviewStore(store / ".review", Budget(10**6, 10**9, 10**9, 10**9))
    fields = {"reason": "review", "model_version": "0", "verdict": "review", "is_anomalous": False,
              "raw_score": 0.0, "score": 0.5, "threshold": 1.0, "ng_threshold": 2.0}
    for path in paths:
        result, item_id = review.add(CATEGORY, fields, path.read_bytes(), "PNG", (128, 128), None, None)
        assert result == "stored"
        review.label(CATEGORY, item_id, label, by="tester", defect_type="stain" if label == "ng" else None)


@pytest.fixture
def mislabelled_store(model_store: Path, demo_root: Path, tmp_path: Path) -> Path:
    """The session's version 1, and good test parts labelled NG: the refit ok bound falls among
    the calibration normals."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store, ignore=shutil.ignore_patterns(".review"))
    goods = sorted((demo_root / CATEGORY / "test" / "good").glob("*.png"))
    _label(store, goods, "ng")
    return store


def _refused(store: Path, error: type[Exception]) -> tuple[str, list[str]]:
    """Recalibrate ``store``, refused with ``error``: its one-line message and the lines printed
    (the table), nothing written."""
    before = _files(store / CATEGORY)
    lines: list[str] = []
    with pytest.raises(error) as refused:
        recalibrate(store, CATEGORY, out=lines.append, warn=lines.append)
    message = str(refused.value)
    assert "\n" not in message
    assert _files(store / CATEGORY) == before  # nothing written
    return message, lines


def test_recalibrate_refuses_a_false_alarm_rate_above_the_ceiling(mislabelled_store: Path) -> None:
    message, lines = _refused(mislabelled_store, recalibrate_module.FalseAlarmCeilingError)
    before = _files(mislabelled_store / CATEGORY)
    assert "95% upper bound" in message and "--max-fpr" in message
    assert any(line.startswith("false alarms, calibration normals") for line in lines)  # the table, to judge by

    # --dry-run: the table, nothing written, and what would be refused
    lines = []
    version_dir, report = recalibrate(mislabelled_store, CATEGORY, out=lines.append, warn=lines.append, dry_run=True)
    assert version_dir is None and _files(mislabelled_store / CATEGORY) == before
    assert report.normals_after["fpr_upper_95"] > 0.1 and report.max_fpr == 0.1
    assert any("would be refused" in line for line in lines) and lines[-1] == "dry run: nothing written"

    # accepted when asked for (8 labels: the small-sample floor too), and the paths it records are absolute
    accept = message.split("--max-fpr ")[-1].split()[0]
    assert "--accept-small-sample" in message  # both refusals named at once
    version_dir, report = recalibrate(mislabelled_store, CATEGORY, out=lines.append, warn=lines.append,
                                      max_fpr=float(accept), accept_small_sample=True)
    assert version_dir is not None and version_dir.name == "2"
    recorded = Manifest.read(version_dir).calibration.labels.review_store
    assert Path(recorded).is_absolute() and Path(report.review_store).is_absolute()
    assert json.loads((version_dir / "recalibration.json").read_text())["max_fpr"] == float(accept)


@pytest.fixture
def bare_store(model_store: Path, tmp_path: Path) -> Path:
    """The session's version 1, no labels."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store, ignore=shutil.ignore_patterns(".review"))
    return store


def _variants(paths: list[Path], folder: Path, count: int) -> list[Path]:
    """``count`` distinct images (other bytes, the same defects): the parts turned and mirrored."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for turn in range(8):
        for path in paths:
            if len(out) == count:
                return out
            with Image.open(path) as part:
                img = part.convert("RGB").rotate(90 * (turn % 4))
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if turn >= 4 else img
            out.append(folder / f"{len(out):03d}.png")
            img.save(out[-1])
    raise AssertionError(f"only {len(out)} variants of {len(paths)} parts")


def test_one_ng_label_moves_no_bound_unless_accepted(bare_store: Path, visible_test_images: dict[str, list[Path]],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The newcomer's case: one review item labelled NG put the ng bound at that part's score
    and the new version was served (73 of 105 defects from ng to review)."""
    from msflow.cli import main

    part = next(iter(visible_test_images.values()))[0]
    _label(bare_store, [part], "ng")
    message, lines = _refused(bare_store, recalibrate_module.SmallSampleError)
    before = _files(bare_store / CATEGORY)
    assert "the ng bound " in message and " on 1 NG label " in message
    assert "nothing written" in message and "--accept-small-sample" in message and "OK label" not in message
    assert any(line.startswith("ng bound (raw)") for line in lines)  # the table first, to judge by

    cli = ["recalibrate", "--store", str(bare_store), "--category", CATEGORY]
    assert main(cli) == 2
    out = capsys.readouterr()
    assert "ng bound (raw)" in out.out and "--accept-small-sample" in out.err
    assert main([*cli, "--dry-run"]) == 0
    assert "would be refused" in capsys.readouterr().err and _files(bare_store / CATEGORY) == before

    assert main([*cli, "--accept-small-sample"]) == 0
    version_dir = bare_store / CATEGORY / "2"
    report = json.loads((version_dir / "recalibration.json").read_text())
    assert report["small_sample"] == {"ng": ["NG"]} and report["labelled_ng"] == 1
    assert Manifest.read(version_dir).calibration.ng_bound == report["after"]["ng_bound"] != report["before"]["ng_bound"]
    assert "too small to support this change" in capsys.readouterr().err  # still said


def test_enough_labels_of_the_classes_that_move_a_bound(bare_store: Path, visible_test_images: dict[str, list[Path]],
                                                        tmp_path: Path) -> None:
    """10 NG labels move the bounds; then one OK label on a part scoring above them all puts
    the ng bound just above it: refused again, naming the OK labels only."""
    parts = _variants([p for paths in visible_test_images.values() for p in paths], tmp_path / "parts",
                      MIN_LABELS_PER_CLASS + 1)
    version = bare_store / CATEGORY / "1"
    scores = recalibrate_module._Scorer(version, Manifest.read(version))(
        [Sample(path=p, label=1, defect_type="stain") for p in parts])
    order = np.argsort(scores)
    _label(bare_store, [parts[i] for i in order[:-1]], "ng")  # all but the highest
    lines: list[str] = []
    _, report = recalibrate(bare_store, CATEGORY, out=lines.append, warn=lines.append, dry_run=True, max_fpr=1.0)
    assert report.labelled_ng == MIN_LABELS_PER_CLASS and report.small_sample == {}
    assert report.after["ng_bound"] != report.before["ng_bound"]
    assert not any("would be refused" in line for line in lines)

    _label(bare_store, [parts[order[-1]]], "ok")  # scores above every NG label
    lines = []
    _, report = recalibrate(bare_store, CATEGORY, out=lines.append, warn=lines.append, dry_run=True, max_fpr=1.0)
    assert report.small_sample == {"ng": ["OK"]}, report.small_sample
    assert report.after["ng_bound"] > scores.max()
    refusal = next(line for line in lines if "would be refused" in line)
    assert " on 1 OK label " in refusal and "NG label" not in refusal


def test_which_classes_move_which_bound() -> None:
    """small_sample_moves on known scores: a bound counts as moved by a small class only where,
    refitted without that class's labels, it would land elsewhere."""
    normals = np.random.default_rng(0).normal(1.0, 0.3, 50)
    none = np.zeros(0)

    def fit(ok: np.ndarray, ng: np.ndarray) -> tuple[float, float]:
        return fit_review_bounds(np.r_[normals, ok], ng, 0.99, 0.01, 0.5, 2.0)[:2]

    old = fit(none, none)
    ten_ng = np.linspace(3.0, 12.0, MIN_LABELS_PER_CLASS)
    for ok, ng, moved in [
        (none, np.array([12.364]), {"ng": ["NG"]}),  # the newcomer's one label
        (none, ten_ng, {}),
        (np.array([20.0]), ten_ng, {"ng": ["OK"]}),  # one OK part above every defect: the ng bound just above it
        (np.array([0.5, 0.6]), ten_ng, {}),  # OK parts among the normals move nothing
        (np.array([0.5, 0.6]), np.array([12.0]), {"ng": ["NG"]}),
        (np.array([5.0, 6.0, 7.0]), none, {"ok": ["OK"], "ng": ["OK"]}),  # OK alone: the false-alarm quantile
        (np.linspace(5.0, 7.0, MIN_LABELS_PER_CLASS), none, {}),
        (none, none, {}),
    ]:
        assert small_sample_moves(fit, ok, ng, old) == moved, (ok, ng)


def test_recalibrate_records_absolute_paths_from_a_relative_store(mislabelled_store: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mislabelled_store.parent)
    _, report = recalibrate(mislabelled_store.name, CATEGORY, review_store=f"{mislabelled_store.name}/.review",
                            out=lambda _: None, warn=lambda _: None, dry_run=True)
    assert report.review_store == str((mislabelled_store / ".review").resolve())


@pytest.mark.parametrize("category", ["..", "../brick", "Brick", ".review", ""])
def test_recalibrate_refuses_what_is_no_category(tmp_path: Path, category: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from msflow.cli import main

    with pytest.raises(RecalibrationError, match="must match"):
        recalibrate(tmp_path, category)
    assert main(["recalibrate", "--store", str(tmp_path), "--category", category]) == 2
    assert "must match" in capsys.readouterr().err


def test_recalibrate_help_states_the_default_ceiling() -> None:
    from msflow.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["recalibrate"]
    text = " ".join(sub.format_help().split())
    assert f"(default {recalibrate_module.DEFAULT_MAX_FPR:g})" in text
    assert f"fewer than {MIN_LABELS_PER_CLASS} labels of a class" in text  # the parser may not import the floor


def test_recalibrate_checks_its_settings(tmp_path: Path) -> None:
    for settings, message in ((dict(target_recall=1.5), "target-recall"), (dict(max_fpr=-0.1), "max-fpr"),
                              (dict(max_fpr=float("nan")), "max-fpr")):
        with pytest.raises(RecalibrationError, match=message):
            recalibrate(tmp_path, CATEGORY, **settings)



def test_export_with_tensorrt_on_a_host_that_cannot_build_plans_is_one_line(
        trained_run: Path, tmp_path: Path, no_onnx: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """`msflow export --tensorrt` without TensorRT or a GPU: the CLI's one-line error (exit 2),
    before any work, not a RuntimeError's traceback."""
    import importlib.util

    import torch

    from msflow.cli import main

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("this host has TensorRT and a CUDA GPU: it builds plans (deploy/gpu-check.sh covers that path)")
    store = tmp_path / "store"
    assert main(["export", "--run", str(trained_run), "--store", str(store), "--tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msflow export: TensorRTUnavailable: ") and "\n" not in err, err
    assert "--tensorrt" in err  # what to drop
    assert not no_onnx and not store.exists()
