"""scripts/build-demo.sh run again after an interruption: a run counts as trained only when
``msflow train`` finished it (its train_log.jsonl ends with the trainer's "done" event); an
unfinished one (checkpoint.pt holds the best epoch so far, last.pt the latest) is resumed
with ``msflow train --resume``, or trained anew where it cannot resume. Before, any
checkpoint.pt counted as trained, and an interrupted run was shipped as the full model.

The script runs for real in a scratch copy of the checkout whose ``.venv/bin/msflow`` is a
stand-in: it logs each call, and its ``train`` finishes a run as the trainer does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_MSFLOW = r"""#!/usr/bin/env bash
# msflow stand-in: one line per call in calls.log; train writes what a finished run holds
root=$(cd "$(dirname "$0")/../.." && pwd)
echo "$*" >> "$root/calls.log"
arg() { local prev=""; for a in "${@:2}"; do [ "$prev" = "$1" ] && echo "$a"; prev=$a; done; }
case $1 in
  train)
    out=$(arg --out "$@")
    case " $* " in *" --resume "*) [ -f "$root/refuse-resume" ] && { echo "cannot resume" >&2; exit 2; } ;; esac
    mkdir -p "$out"
    touch "$out/checkpoint.pt" "$out/last.pt" "$out/config.json"
    echo '{"event": "done", "best_holdout_nll": -1.0, "seconds": 1.0}' >> "$out/train_log.jsonl" ;;
  eval) touch "$(arg --run "$@")/report.json" ;;
  export)
    run=$(arg --run "$@"); store=$(arg --store "$@")
    n=$(ls "$store/$(basename "$run")" 2>/dev/null | grep -c '^[0-9]' || true)
    mkdir -p "$store/$(basename "$run")/$((n + 1))"
    touch "$store/$(basename "$run")/$((n + 1))/manifest.json" ;;
esac
"""

QUICK = "--data data/demo --category brick --lr 1e-3 --meta-epochs 3 --sub-epochs 4 --warmup-meta-epochs 1 " \
        "--decay-milestones 9 --out runs/demo-quick/brick"
FULL = "--data data/demo --category brick --out runs/demo/brick"
EPOCH = {"epoch": 3, "holdout_nll": -2.0, "selected": True, "seconds": 9.0}
DONE = {"event": "done", "best_holdout_nll": -2.0, "seconds": 90.0}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A scratch checkout: the script, the stand-in msflow, the demo data set marker, and a
    quick model of brick already served (so the full pass is what runs, unless a test drops it)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "build-demo.sh", tmp_path / "scripts" / "build-demo.sh")
    fake = tmp_path / ".venv" / "bin" / "msflow"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_MSFLOW)
    fake.chmod(0o755)
    (tmp_path / "data" / "demo" / "brick").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "brick" / "dataset.json").write_text("{}")
    (tmp_path / "model_store" / "brick" / "1").mkdir(parents=True)
    (tmp_path / "model_store" / "brick" / "1" / "manifest.json").write_text("{}")
    return tmp_path


def run_folder(checkout: Path, run: str, files: tuple[str, ...], log: list[dict]) -> None:
    folder = checkout / run
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"weights")
    (folder / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))


def build(checkout: Path) -> tuple[list[str], str]:
    """Run the script; (the train calls, its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSFLOW_")}
    done = subprocess.run(["bash", str(checkout / "scripts" / "build-demo.sh")], capture_output=True, text=True,
                          timeout=60, env={**env, "MSFLOW_DEMO_CATEGORIES": "brick"})
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (checkout / "calls.log").read_text().splitlines()
    assert any(call.startswith("export --run runs/demo/brick") for call in calls)  # the full model shipped
    return [call.removeprefix("train ") for call in calls if call.startswith("train ")], done.stdout


INTERRUPTED = ("checkpoint.pt", "last.pt", "config.json")


@pytest.mark.parametrize(("files", "log", "trains"), [
    pytest.param(INTERRUPTED, [{"event": "start"}, EPOCH], [f"{FULL} --resume"], id="interrupted-resumes"),
    pytest.param(INTERRUPTED, [{"event": "start"}, EPOCH, DONE], [], id="finished-is-not-trained-again"),
    pytest.param(INTERRUPTED, [{"event": "start"}, EPOCH, DONE, {"event": "start"}, EPOCH], [f"{FULL} --resume"],
                 id="a-longer-resume-interrupted-resumes"),
    pytest.param(("checkpoint.pt",), [{"event": "start"}, EPOCH], [FULL], id="no-last-pt-trains-anew"),
    pytest.param((), [], [FULL], id="empty-folder-trains"),
])
def test_the_full_pass_trains_only_what_did_not_finish(checkout: Path, files: tuple[str, ...], log: list[dict],
                                                       trains: list[str]) -> None:
    run_folder(checkout, "runs/demo/brick", files, log)
    train_calls, out = build(checkout)
    assert train_calls == trains, out
    assert ("was interrupted" in out) == any("--resume" in call for call in trains)


def test_a_run_that_cannot_resume_is_trained_anew(checkout: Path) -> None:
    run_folder(checkout, "runs/demo/brick", INTERRUPTED, [{"event": "start"}, EPOCH])
    (checkout / "refuse-resume").touch()  # e.g. its settings differ from the script's now
    train_calls, out = build(checkout)
    assert train_calls == [f"{FULL} --resume", FULL], out
    assert "cannot resume: training it anew" in out


def test_an_interrupted_quick_run_resumes_too(checkout: Path) -> None:
    shutil.rmtree(checkout / "model_store" / "brick")  # no quick model served yet
    run_folder(checkout, "runs/demo-quick/brick", INTERRUPTED, [{"event": "start"}, EPOCH])
    train_calls, out = build(checkout)
    assert train_calls == [f"{QUICK} --resume", FULL], out


def test_a_run_the_trainer_finished_counts_as_trained(checkout: Path, trained_run: Path) -> None:
    """The real trainer's log, not the stand-in's: what it writes last is what the script reads."""
    shutil.copytree(trained_run, checkout / "runs" / "demo" / "brick")
    train_calls, out = build(checkout)
    assert train_calls == [], out
    assert "finished training before" in out
