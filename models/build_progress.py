"""Progress of a model build, kept beside the model store in ``<store>/.build/status.json``.

A builder (``scripts/build-demo.sh`` through ``msflow build-status``) records what each
category is doing; the server reads the file and shows it in ``GET /v1/models`` and the
console, so a newcomer sees "grass: training" rather than an empty model list. The file
is one small JSON document, replaced atomically (readers never see half a file) and read
with a size budget (a stray big file costs nothing).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.atomic_files import write_atomic
from models.manifest import CATEGORY_PATTERN

BUILD_DIR = ".build"  # dot folder: the registry never takes it for a category
STATUS_FILE = "status.json"
MAX_STATUS_BYTES = 64 * 1024
STAGE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # quick, full, build: a word, as categories are

StepState = Literal["waiting", "training", "evaluating", "exporting", "served", "failed"]
# stopped: the builder was stopped (the demo left) before it finished; its steps say where.
BuildState = Literal["running", "done", "failed", "stopped"]


class StepProgress(BaseModel):
    model_config = ConfigDict(extra="ignore")
    state: StepState
    detail: str = Field("", max_length=500)
    at: datetime


class CategoryProgress(BaseModel):
    model_config = ConfigDict(extra="ignore")
    stages: dict[str, StepProgress] = Field(default_factory=dict, description="stage (quick, full) -> its step")


class BuildProgress(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_assignment=True)
    state: BuildState = "running"
    updated_at: datetime
    categories: dict[str, CategoryProgress] = Field(default_factory=dict)


def status_path(store: Path) -> Path:
    return Path(store) / BUILD_DIR / STATUS_FILE


def read_progress(store: Path) -> BuildProgress | None:
    """The store's build progress, or None when there is none or the file is unusable
    (missing, over :data:`MAX_STATUS_BYTES`, not valid): progress is advisory, never an error."""
    path = status_path(store)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_STATUS_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_STATUS_BYTES:
        return None
    try:
        return BuildProgress.model_validate_json(raw)
    except ValidationError:
        return None


def record_step(store: Path, stage: str, category: str, state: StepState, detail: str = "") -> BuildProgress:
    """Record that ``category`` is at ``state`` in ``stage``; the build is running again.
    ValueError for a category a model store could not hold (``../x``) or a stage of another form."""
    if not CATEGORY_PATTERN.fullmatch(category):
        raise ValueError(f"category {category!r} is not a model-store category name "
                         f"(lower-case letters, digits, - and _, up to 64: {CATEGORY_PATTERN.pattern})")
    if not STAGE_PATTERN.fullmatch(stage):
        raise ValueError(f"stage {stage!r} is not a stage name (like quick or full: {STAGE_PATTERN.pattern})")
    now = datetime.now(timezone.utc)
    progress = read_progress(store) or BuildProgress(updated_at=now)
    progress.state, progress.updated_at = "running", now
    progress.categories.setdefault(category, CategoryProgress()).stages[stage] = StepProgress(
        state=state, detail=detail, at=now)
    _write(store, progress)
    return progress


def record_build(store: Path, state: BuildState) -> BuildProgress:
    """Record the state of the build as a whole (``done`` when every category is served)."""
    now = datetime.now(timezone.utc)
    progress = read_progress(store) or BuildProgress(updated_at=now)
    progress.state, progress.updated_at = state, now
    _write(store, progress)
    return progress


def _write(store: Path, progress: BuildProgress) -> None:
    path = status_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(progress.model_dump(mode="json"), indent=1))
