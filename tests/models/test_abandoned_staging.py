"""An export killed before it publishes (SIGTERM from ``timeout`` or a job's deadline, the OOM
killer in the ONNX export) left its ``.export-*`` folder in the category for good, model and
all: measured, ``msflow export`` sent SIGTERM once ``model.onnx`` was written left a 15 MB
``.export-ms_gvn9g`` that no later export, nor anything else, removed. Now the folder is held
by its writer, and the next publish removes those whose writer is gone, never a live one's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from models.manifest import MANIFEST, list_versions
from models.publish import STAGING_LOCK, new_staging, publish_version

_WRITER = """
import sys, time
from pathlib import Path
from models.publish import new_staging
staging = new_staging(Path(sys.argv[1]), ".export-")
(staging.path / "model.onnx").write_bytes(b"w" * 1_000_000)
print(staging.path.name, flush=True)
time.sleep(600)
"""


def _writer(category_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """Another process building a version in ``category_dir``: its staging folder's name."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(category_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _publish(category_dir: Path) -> str:
    staging = new_staging(category_dir, ".export-")
    try:
        return publish_version(category_dir, staging.path, None,
                               lambda v: (staging.path / MANIFEST).write_text(json.dumps({"version": v}))).name
    finally:
        staging.close()


def test_a_dead_writers_folder_goes_at_the_next_publish_a_live_ones_stays(tmp_path: Path) -> None:
    dead, dead_name = _writer(tmp_path)
    live, live_name = _writer(tmp_path)
    other = Path(tempfile.mkdtemp(prefix=".recalibrate-", dir=tmp_path))  # a writer that holds no lock
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert (tmp_path / dead_name / "model.onnx").is_file()  # what the killed export left
        assert _publish(tmp_path) == "1"
        assert not (tmp_path / dead_name).exists()
        assert (tmp_path / live_name / "model.onnx").is_file() and other.is_dir()
        assert not (tmp_path / "1" / STAGING_LOCK).exists()  # the published version carries no lock
        assert list_versions(tmp_path) == ["1"]
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(10)
    assert _publish(tmp_path) == "2"
    assert not (tmp_path / live_name).exists() and other.is_dir()


def test_the_publishing_writer_keeps_its_own_folder(tmp_path: Path) -> None:
    staging = new_staging(tmp_path, ".export-")
    (staging.path / "model.onnx").write_bytes(b"w")
    final = publish_version(tmp_path, staging.path, None, lambda v: (staging.path / MANIFEST).write_text("{}"))
    staging.close()
    assert (final / "model.onnx").is_file() and sorted(os.listdir(final)) == [MANIFEST, "model.onnx"]


@pytest.mark.slow
def test_an_export_killed_midway_is_cleaned_up_by_the_next(trained_run: Path, tmp_path: Path) -> None:
    """The real thing: ``msflow export`` sent SIGTERM once its graph is written, then another
    export of the same run into the same store."""
    from models.export import export_run

    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "msflow.cli", "export", "--run", str(trained_run), "--store",
                             str(store)], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    category_dir = store / "brick"
    try:
        deadline = time.monotonic() + 240
        while not any(p.stat().st_size for p in category_dir.glob(".export-*/model.onnx")):
            assert proc.poll() is None and time.monotonic() < deadline, "the export ended before writing its graph"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [p.name for p in category_dir.glob(".export-*")]  # left behind, model and all
    final = export_run(trained_run, store)
    assert final.name == "1" and not list(category_dir.glob(".export-*"))
