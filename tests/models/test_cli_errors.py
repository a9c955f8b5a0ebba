"""What the user gets wrong on the command line: one line, `msflow <cmd>: ...`, exit 2, and
before any work (the model load, a minute of prediction, a whole benchmark).

No trained model is needed: every check here runs before a model would be loaded. The runs
are hand-made folders whose checkpoint.pt is not even a checkpoint, so a check that came
after the load would fail with "corrupt checkpoint" instead of its own message.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import fake_version

from models.build_progress import read_progress, record_step, status_path
from msflow.cli import main

CATEGORY = "brick"
CHECKPOINT_BYTES = b"not a checkpoint: a check that loads the model fails on it"


def _run(tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "data"), "category": CATEGORY}))
    (run / "checkpoint.pt").write_bytes(CHECKPOINT_BYTES)
    return run


def _version(store: Path, category: str, version: str, **update: object) -> Path:
    """A version folder whose manifest says where it was exported from (``update``)."""
    from models.manifest import Manifest

    folder = fake_version(store, category, version)
    Manifest.read(folder).model_copy(update=update).write(folder)
    return folder


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str, *says: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"msflow {command}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(s in err for s in says), err
    return err


# ------------------------------------------------------------------ eval

EVAL_REFUSALS = [
    (["--device", "foo"], "unknown device 'foo'"),  # a RuntimeError traceback from torch
    (["--device", "mps"], "cpu or cuda"),
    (["--threshold", "nan"], "finite"),  # written as a bare NaN into report.json (not JSON)
    (["--threshold", "inf"], "finite"),
    (["--threshold=-inf"], "finite"),
    (["--batch-size", "0"], "batch size must be >= 1"),  # "range() arg 3 must not be zero" after the prediction
    (["--target-fpr", "1.5"], "target FPR"),  # refused only after the prediction
    (["--version", "/nonexistent/brick/1"], "no manifest.json in /nonexistent/brick/1"),  # after the prediction
]
if not torch.cuda.is_available():  # an AssertionError traceback ("Torch not compiled with CUDA enabled")
    EVAL_REFUSALS += [(["--device", "cuda"], "no usable CUDA GPU"), (["--device", "cuda:1"], "no usable CUDA GPU")]


@pytest.mark.parametrize(("extra", "says"), EVAL_REFUSALS, ids=[" ".join(e) for e, _ in EVAL_REFUSALS])
def test_eval_refuses_bad_settings_in_one_line_before_loading_the_model(
        extra: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    assert main(["eval", "--run", str(run), *extra]) == 2
    _one_line_error(capsys, "eval", says)
    assert not (run / "report.json").exists()


def test_eval_names_the_config_file_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said `JSONDecodeError: Expecting property name ...`, not which file."""
    run = _run(tmp_path)
    (run / "config.json").write_text("{bad")
    assert main(["eval", "--run", str(run)]) == 2
    _one_line_error(capsys, "eval", str(run / "config.json"), "not valid JSON", "Expecting property name")
    (run / "config.json").write_text("[1, 2]")
    assert main(["eval", "--run", str(run)]) == 2
    _one_line_error(capsys, "eval", str(run / "config.json"), "not a run config")


def test_eval_refuses_the_threshold_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A version of another category (or of this run before a retraining) was applied as is:
    every defect "missed", exit 0, no warning. The manifest records the exported checkpoint's
    sha256 (recalibrated versions keep it); a mismatch is refused before the model loads."""
    run = _run(tmp_path)
    ours = hashlib.sha256(CHECKPOINT_BYTES).hexdigest()
    store = tmp_path / "store"
    other = _version(store, "grass", "1", source_run="/runs/grass", source_checkpoint_sha256="a" * 64)
    assert main(["eval", "--run", str(run), "--version", str(other)]) == 2
    _one_line_error(capsys, "eval", "another checkpoint", "/runs/grass", ours[:12], "--threshold")
    retrained = _version(store, CATEGORY, "1", source_run=str(run), source_checkpoint_sha256="b" * 64)
    assert main(["eval", "--run", str(run), "--version", str(retrained)]) == 2
    _one_line_error(capsys, "eval", "another checkpoint")
    # An older manifest, without the sha256: another category from another run is refused...
    old_other = _version(store, "grass", "2", source_run="/runs/grass")
    assert main(["eval", "--run", str(run), "--version", str(old_other)]) == 2
    _one_line_error(capsys, "eval", "category 'grass'", "'brick'")
    assert not (run / "report.json").exists()
    # ... the same checkpoint passes the check (and the fake checkpoint fails to load after it).
    same = _version(store, "renamed", "1", source_run="/elsewhere", source_checkpoint_sha256=ours)
    assert main(["eval", "--run", str(run), "--version", str(same)]) == 2
    _one_line_error(capsys, "eval", "corrupt checkpoint")
    # ... and an older manifest of this category is applied with a warning: it cannot be checked.
    from models.evaluate import check_version_matches_run

    old_same = _version(store, CATEGORY, "2", source_run=str(run))
    with pytest.warns(UserWarning, match="does not record which checkpoint"):
        assert check_version_matches_run(old_same, run, {"category": CATEGORY}).version == "2"


def test_eval_takes_a_threshold_or_a_version_not_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    version = _version(tmp_path / "store", CATEGORY, "1")
    assert main(["eval", "--run", str(run), "--threshold", "3", "--version", str(version)]) == 2
    _one_line_error(capsys, "eval", "not both")


# ------------------------------------------------------------------ bench

@pytest.fixture()
def no_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before the benchmark: running it fails the test."""
    import msflow.bench

    def ran(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark ran before the refusal")

    monkeypatch.setattr(msflow.bench, "bench_engines", ran)


@pytest.mark.usefixtures("no_benchmark")
def test_bench_refuses_bad_settings_in_one_line_before_benchmarking(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    _version(store, CATEGORY, "1")
    afile = tmp_path / "afile"
    afile.write_text("")
    model = ["bench", "--model", str(store / CATEGORY)]
    for argv, says in (
        (["bench", "--model", str(tmp_path / "nonexistent")], "EngineError: "),  # an EngineError traceback
        (["bench", "--model", str(afile)], "EngineError: "),
        ([*model, "--repeats", "0"], "repeats must be >= 1"),  # timed 1 repeat and recorded 0
        ([*model, "--device", "foo"], "unknown device 'foo'"),  # fell back to auto
        ([*model, "--batch-sizes", "0"], "batch sizes must be >= 1"),
        ([*model, "--out", str(afile / "x.json")], f"cannot write the report to {afile / 'x.json'}"),
        ([*model, "--out", str(tmp_path)], "is a folder"),
    ):
        assert main(argv) == 2, argv
        _one_line_error(capsys, "bench", says)
    if not torch.cuda.is_available():
        assert main([*model, "--device", "cuda"]) == 2
        _one_line_error(capsys, "bench", "no CUDA GPU")


def test_bench_writes_its_report_outside_the_model_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The default report went into the version folder: a published version changed, and a
    read-only store mount failed after the whole benchmark. An engine unknown here keeps the
    benchmark to its bookkeeping."""
    store = tmp_path / "store"
    version = _version(store, CATEGORY, "1")
    before = sorted(p.name for p in version.iterdir())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc = main(["bench", "--model", str(store / CATEGORY), "--engines", "no-such-engine", "--batch-sizes", "1",
               "--repeats", "1"])
    assert rc == 1  # the one engine asked for failed
    assert sorted(p.name for p in version.iterdir()) == before
    report = cwd / f"bench-{CATEGORY}-1-{socket.gethostname()}.json"
    assert json.loads(report.read_text())["settings"]["repeats"] == 1
    assert f"report: {report.name}" in capsys.readouterr().out
    assert not list(cwd.glob(".*probe"))


# ------------------------------------------------------------------ serve and worker

@pytest.mark.parametrize("kind", ["file", "missing"])
def test_serve_refuses_a_store_that_is_no_folder_in_one_line(kind: str, tmp_path: Path) -> None:
    """uvicorn printed the app's start-up traceback, then "Application startup failed", exit 3."""
    store = tmp_path / "store"
    if kind == "file":
        store.write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "msflow.cli", "serve", "--port", str(port), "--store", str(store)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == 2, proc.stderr
    says = "is not a folder" if kind == "file" else "does not exist"
    assert proc.stderr.startswith("msflow serve: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr and str(store) in proc.stderr, proc.stderr


def test_serve_and_worker_check_the_store_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent"
    monkeypatch.setenv("MSFLOW_MODEL_STORE", str(missing))
    monkeypatch.delenv("MSFLOW_REDIS_URL", raising=False)
    assert main(["worker"]) == 2
    _one_line_error(capsys, "worker", f"model store {missing} does not exist")
    assert main(["worker", "--store", str(tmp_path / "other")]) == 2
    _one_line_error(capsys, "worker", "other does not exist")
    assert main(["serve", "--port", "1"]) == 2  # refused before it binds anything
    _one_line_error(capsys, "serve", f"model store {missing} does not exist")


# ------------------------------------------------------------------ build-status

@pytest.mark.parametrize(("stage", "category", "says"), [
    ("quick", "../../x", "category '../../x'"),
    ("quick", "Brick", "category 'Brick'"),
    ("../q", "brick", "stage '../q'"),
    ("quick stage", "brick", "stage 'quick stage'"),
])
def test_build_status_refuses_names_a_store_could_not_hold(stage: str, category: str, says: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`--category ../../x` exited 0 and wrote the key "../../x" into status.json."""
    assert main(["build-status", "--store", str(tmp_path), "--stage", stage, "--category", category,
                 "--state", "training"]) == 2
    _one_line_error(capsys, "build-status", says)
    assert not status_path(tmp_path).exists()
    with pytest.raises(ValueError, match="is not a"):
        record_step(tmp_path, stage, category, "training")
    assert read_progress(tmp_path) is None
