"""The build-progress file a builder writes beside the model store and the server reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from models.build_progress import MAX_STATUS_BYTES, read_progress, record_build, record_step, status_path
from msflow.cli import main


def test_steps_accumulate_per_category_and_stage(tmp_path: Path) -> None:
    assert read_progress(tmp_path) is None
    record_step(tmp_path, "quick", "brick", "training")
    record_step(tmp_path, "quick", "brick", "served", "quick model")
    record_step(tmp_path, "quick", "grass", "training")
    record_step(tmp_path, "full", "brick", "training")
    progress = read_progress(tmp_path)
    assert progress is not None and progress.state == "running"
    assert progress.categories["brick"].stages["quick"].state == "served"
    assert progress.categories["brick"].stages["quick"].detail == "quick model"
    assert progress.categories["brick"].stages["full"].state == "training"
    assert progress.categories["grass"].stages["quick"].state == "training"
    assert record_build(tmp_path, "done").state == "done"
    assert read_progress(tmp_path).state == "done"  # type: ignore[union-attr]
    assert not list(status_path(tmp_path).parent.glob("*.tmp"))  # written by rename, nothing left over


def test_an_unusable_file_reads_as_no_progress(tmp_path: Path) -> None:
    path = status_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert read_progress(tmp_path) is None
    path.write_text('{"updated_at": "2026-01-01T00:00:00Z", "categories": {"x": {"stages": {"q": '
                    '{"state": "exploded", "at": "2026-01-01T00:00:00Z"}}}}}')
    assert read_progress(tmp_path) is None
    path.write_text(" " * (MAX_STATUS_BYTES + 1) + "{}")  # over budget: never parsed
    assert read_progress(tmp_path) is None
    record_step(tmp_path, "quick", "brick", "training")  # a builder starts over a bad file
    assert read_progress(tmp_path).categories["brick"].stages["quick"].state == "training"  # type: ignore[union-attr]


def test_unknown_states_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        record_step(tmp_path, "quick", "brick", "exploded")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        record_build(tmp_path, "exploded")  # type: ignore[arg-type]


def test_cli_records_steps_and_the_build(tmp_path: Path) -> None:
    assert main(["build-status", "--store", str(tmp_path), "--state", "running"]) == 0
    assert main(["build-status", "--store", str(tmp_path), "--stage", "quick", "--category", "brick",
                 "--state", "training", "--detail", "12 sub-epochs"]) == 0
    progress = read_progress(tmp_path)
    assert progress is not None and progress.state == "running"
    assert progress.categories["brick"].stages["quick"].detail == "12 sub-epochs"
