"""The engine manifest: what a model-store version contains, and how to read its outputs.

This is the contract between the offline exporter and the service, so it is small, has no
torch dependency, and is validated on both sides::

    model_store/<category>/<version>/
        model.onnx       one graph: uint8 NHWC images -> scores and maps
        model.plan       optional TensorRT engine built from model.onnx
        manifest.json    this schema
        report.json      the evaluation the export was made from (optional)
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
DEFAULT_TARGET_FPR = 0.01  # calibration policy default: share of normal parts a threshold may flag
# The review band's default width without labelled anomalies, as a fraction of the score span
# (score_max - score_min): the ng bound sits at normalised score 0.5 + this.
DEFAULT_REVIEW_MARGIN = 0.1
DEFAULT_NG_RECALL = 0.99  # the ng bound's recall goal on labelled anomalies when no policy names one
Verdict = Literal["ok", "review", "ng"]
CATEGORY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# A version folder's name: the exporter numbers them; a name given by hand stays one path
# component (no separator, no leading dot: those are exports in progress).
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NUMERIC_VERSION = re.compile(r"[0-9]+")
# A file a manifest names: one name inside its version folder. "../1/model.onnx" or an absolute
# path served another folder's file (digest and all), which the folder's deletion then broke.
FILE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
FileName = Annotated[str, StringConstraints(pattern=FILE_NAME_PATTERN)]

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A model-store version is incomplete, tampered with or from an unknown schema."""


class _Strict(BaseModel):
    # Finite floats only: pydantic writes NaN and infinity as null, which it then cannot read
    # back: a manifest with one would be written fine and refused by every server.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class TensorSpec(_Strict):
    name: str
    dtype: str
    shape: list[int | str]  # "batch" for the dynamic axis


class ScoreStats(_Strict):
    count: int
    mean: float
    std: float
    min: float
    p50: float
    p95: float
    p99: float
    max: float


class CalibrationSource(_Strict):
    """Which normal images the threshold was fitted on, so a reader can judge how far to trust it."""

    kind: Literal["calibration_set", "calibration_images", "training_holdout"]
    path: str | None = None  # the folder (calibration set or --calibration-images)
    count: int
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 over the sorted sha256s of the images
    never_trained_on: bool  # False for the training holdout, which may share pixels with training


class LabelSource(_Strict):
    """The operator labels a recalibration was fitted on (``msflow recalibrate``)."""

    review_store: str | None = None
    ok: int = Field(ge=0, description="labelled OK images used (known goods)")
    ng: int = Field(ge=0, description="labelled NG images used")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 over the sorted "<image sha256>:<label>" lines
    target_recall: float
    excluded_trained_on: int = 0  # labelled OK images the model was trained on: not known goods for it


SCORE_DECIMALS = 6  # the answers' normalised score: finer than any threshold's meaning


class Calibration(_Strict):
    """How raw engine outputs become a verdict and a heatmap.

    ``normalised = clamp((raw - threshold) / (score_max - score_min) + 0.5, 0, 1)``: the
    threshold maps to 0.5, so it can later move without re-exporting the graph.

    ``fpr_calibration`` is the share of calibration normals at or above the threshold, and
    ``fpr_upper_95`` its one-sided 95% Clopper-Pearson bound: with 60 normals and none
    flagged the true false-alarm rate can still be up to ~4.9%.

    Three-way verdict (:meth:`verdict`): ``ok`` below ``threshold``, ``ng`` at or above
    :attr:`ng_bound`, ``review`` between (a person decides). ``threshold`` keeps its meaning
    for ``is_anomalous``. ``ng_threshold`` is absolute (a raw score), so moving the ok bound
    alone does not move it, but it never sits below the ok bound (the band is then empty).
    Manifests written before it existed get the default margin above their threshold.
    """

    score_output: str
    method: Literal["target_fpr", "target_recall", "f1_optimal", "normal_quantile", "review_labels"]
    threshold: float
    score_min: float
    score_max: float
    normal_scores: ScoreStats
    anomalous_images: int = 0
    map_low: float  # anomaly_map value shown as the coolest colour (median of normal pixels)
    map_high: float  # value shown as the hottest colour
    pixel_threshold: float  # anomaly_map value above which a pixel counts as defective
    quantile: float | None = None
    margin: float | None = None
    target_fpr: float | None = None
    target_recall: float | None = None
    fpr_calibration: float | None = None
    fpr_upper_95: float | None = None
    recall_calibration: float | None = None  # on the labelled anomalies, when there are some
    source: CalibrationSource | None = None
    ng_threshold: float | None = None  # raw score from which a part is NG without review (None: default margin)
    ng_method: Literal["margin", "labelled"] | None = None  # margin: no labelled anomalies; labelled: fitted
    review_margin: float | None = None  # the margin method's width, a fraction of the score span
    labels: LabelSource | None = None  # recalibrated: the operator labels it was fitted on

    @property
    def span(self) -> float:
        return max(self.score_max - self.score_min, 1e-12)

    @property
    def ng_bound(self) -> float:
        """The effective ng bound: the recorded one (or the default margin), never below ``threshold``."""
        ng = self.ng_threshold
        if ng is None:
            ng = self.threshold + (self.review_margin if self.review_margin is not None
                                   else DEFAULT_REVIEW_MARGIN) * self.span
        return max(ng, self.threshold)

    def verdict(self, raw: float) -> Verdict:
        if raw < self.threshold:
            return "ok"
        return "ng" if raw >= self.ng_bound else "review"

    def normalise_score(self, raw: float) -> float:
        return min(max((raw - self.threshold) / self.span + 0.5, 0.0), 1.0)

    def reported_score(self, raw: float, decimals: int = SCORE_DECIMALS) -> float:
        """The normalised score as an answer states it: rounded, and on the verdict's side of
        0.5, so that a client reading ``score >= 0.5`` agrees with ``is_anomalous`` (a raw
        score 1e-7 under the threshold rounded to 0.5 while its verdict was ok)."""
        score = round(self.normalise_score(raw), decimals)
        if raw >= self.threshold:
            return max(score, 0.5)
        return min(score, 0.5 - 10.0 ** -decimals)

    def with_threshold(self, threshold: float, ng_threshold: float | None = None) -> "Calibration":
        """This calibration with the ok bound (and, if given, the ng bound) moved."""
        update: dict[str, float] = {"threshold": threshold}
        if ng_threshold is not None:
            update["ng_threshold"] = ng_threshold
        elif self.ng_threshold is None:  # keep an old manifest's default band where it was
            update["ng_threshold"] = self.ng_bound
        return self.model_copy(update=update)


class OnnxInfo(_Strict):
    file: FileName = "model.onnx"
    opset: int
    exporter: str
    torch_version: str
    onnx_version: str
    parity_max_abs_diff: dict[str, float]


class TensorRTInfo(_Strict):
    file: FileName = "model.plan"
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: Literal["fp16", "fp32"] = "fp16"
    min_batch: int
    opt_batch: int
    max_batch: int


class TrainingData(_Strict):
    """Where the training normals came from (``msflow train``'s run config)."""

    train_images: int | None = None  # normals the flows trained on (holdout excluded)
    reviewed_ok_images: int = 0  # of those, operator-confirmed OK images from a review store
    review_store: str | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    category: str = Field(pattern=CATEGORY_PATTERN.pattern)
    version: str
    created_at: datetime
    input_size: int
    backbone: str
    model: dict[str, Any]  # the MSFlowConfig it was exported from
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: Calibration
    metrics: dict[str, Any] | None = None
    onnx: OnnxInfo
    tensorrt: TensorRTInfo | None = None
    files: dict[FileName, FileEntry]
    source_run: str | None = None
    # sha256 of the run's checkpoint.pt that was exported, so the torch engine can tell a run
    # retrained in place since (None: a manifest written before this was recorded).
    source_checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    training: TrainingData | None = None
    recalibrated_from: str | None = None  # the version whose engine files this one reuses (msflow recalibrate)

    @classmethod
    def read(cls, version_dir: str | Path) -> "Manifest":
        path = Path(version_dir) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST} in {version_dir}")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as e:
            raise ManifestError(f"{path} is not a valid manifest: {e}") from e

    def write(self, version_dir: str | Path) -> Path:
        path = Path(version_dir) / MANIFEST
        path.write_text(self.model_dump_json(indent=2))
        return path

    def verify_files(self, version_dir: str | Path, names: list[str] | None = None) -> None:
        """Check sizes and sha256s, so a truncated or swapped file fails at load, not mid-request."""
        for name in names or list(self.files):
            entry = self.files.get(name)
            if entry is None:
                raise ManifestError(f"{name} is not listed in the manifest of {version_dir}")
            path = Path(version_dir) / name
            if not path.is_file():
                raise ManifestError(f"{path} is listed in the manifest but missing")
            size = path.stat().st_size
            if size != entry.bytes:
                raise ManifestError(f"{path} has {size} bytes, the manifest says {entry.bytes} (truncated?)")
            if sha256_file(path) != entry.sha256:
                raise ManifestError(f"{path} does not match its sha256 in the manifest (modified or corrupt)")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: str | Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=Path(path).stat().st_size)


def is_numeric_version(version: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts "1²", which ``int`` then refuses (a
    stray folder of that name stopped the store watch for good)."""
    return NUMERIC_VERSION.fullmatch(version) is not None


def list_versions(category_dir: str | Path) -> list[str]:
    """Version folders that hold a manifest, oldest first (numeric versions sort numerically).
    A folder that cannot be read is left out, with a warning (:func:`version_folders`): one
    version exported with the wrong owner or mode must not hide the others."""
    versions, unreadable = version_folders(category_dir)
    for why in unreadable.values():
        log.warning("model store: %s; skipped", why)
    return versions


def version_folders(category_dir: str | Path) -> tuple[list[str], dict[str, str]]:
    """:func:`list_versions` without a word: the versions, and the version folders that cannot
    be read, each with why (the watching server says each once, and shows it as a failed
    version). A folder with no manifest yet is no version (a copy under way: rsync makes the
    folder first); one whose manifest is there but is no readable file is unreadable: a
    directory, a link to nothing, or a folder this process may not enter (not for root)."""
    d = Path(category_dir)
    if not d.is_dir():
        return [], {}
    versions, unreadable = [], {}
    for p in d.iterdir():
        if p.name.startswith("."):  # an export still being written (or one that died), the lock
            continue
        manifest = p / MANIFEST
        try:
            if not stat.S_ISDIR(os.stat(p).st_mode):
                continue
            if stat.S_ISREG(os.stat(manifest).st_mode):
                versions.append(p.name)
            else:
                unreadable[p.name] = f"{manifest} is not a file"
        except (FileNotFoundError, NotADirectoryError):
            if os.path.islink(manifest):
                unreadable[p.name] = f"{manifest} is a link to nothing (its target is missing)"
        except OSError as exc:  # EACCES on the folder (wrong owner), ELOOP, EIO
            unreadable[p.name] = f"{p} cannot be read ({exc.strerror or exc})"
    return sorted(versions, key=_version_key), unreadable


def _version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if is_numeric_version(version) else (1, 0, version)
