"""`msflow export`: a run -> a self-contained engine version in the model store.

The graph is ONE ONNX model from uint8 NHWC pixels to the answer (normalisation,
backbone, flows, fusion, upsampling, aggregation, top-k), with a dynamic batch axis.
Export checks parity against PyTorch before anything is written, calibrates on normals the
flows never trained on (:func:`models.calibrate.calibration_samples`) with the exported graph itself (so the thresholds are those of the engine that
will serve), and writes the version folder atomically.

Everything that can be checked without the graph (category, policy and its targets, the
validation and calibration folders, ``map_sigma``, the version name, TensorRT's needs) is
checked before the ~15 s of ONNX export, and a failure leaves no folder behind (not even an
empty category). The category is the run's own (``config.json``) or ``--category``, never a
folder name guessed from the run's path. A run exported before with the same checkpoint and
the same calibration inputs is exported again, with a warning naming that version.
"""

from __future__ import annotations

import json
import math
import logging
import shutil
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.calibrate import DEFAULT_TARGET_FPR, Policy, calibrate, calibration_samples
from models.data import MVTecCategory, Sample
from models.data_loading import load_images
from models.manifest import (CATEGORY_PATTERN, CalibrationSource, Manifest, ManifestError, OnnxInfo, TensorSpec,
                             TrainingData, file_entry, list_versions)
from models.publish import LOCK_FILE, check_version_name, new_staging, publish_version
from models.review_store import REVIEWED_OK
from models.msflow import MSFlow, MSFlowConfig, with_map_sigma
from models.runs import REPORT, checkpoint_sha256, eval_report, load_model, read_json

log = logging.getLogger(__name__)

OUTPUTS = ("image_score", "image_score_log", "absolute_score", "anomaly_map")
POLICIES = ("target_fpr", "target_recall", "f1_optimal")
SCORE_OUTPUTS = ("image_score_log", "absolute_score")
OPSET = 20
DEFAULT_SCORE_OUTPUT = "image_score_log"
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class DuplicateExportWarning(UserWarning):
    """The category holds a version of the same checkpoint calibrated on the same inputs."""


class StaleReportWarning(UserWarning):
    """The run's report.json is not of the weights (or category) exported: left out of the version."""


def _warn(warn: Callable[[str], None] | None, line: str, category: type[UserWarning]) -> None:
    if warn is not None:
        warn(line)
    else:
        warnings.warn(line, category, stacklevel=3)


class InferenceGraph(nn.Module):
    """What the engine computes: uint8 images -> the serving outputs, in a fixed order."""

    def __init__(self, model: MSFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, paper_maps=False)
        return tuple(out[name] for name in OUTPUTS)


def export_onnx(model: MSFlow, path: Path, opset: int = OPSET, max_batch: int = 256) -> Path:
    """Write the one-graph ONNX model (dynamo exporter, dynamic batch, constants folded)."""
    graph = InferenceGraph(model.cpu().eval()).eval()
    size = model.config.input_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, (example,), str(path), input_names=["images"], output_names=list(OUTPUTS),
            dynamic_shapes={"images": {0: batch}}, opset_version=opset, dynamo=True, optimize=True,
            external_data=False, verbose=False,
        )
    return path


def onnx_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUTS}
    for i in range(0, len(images), batch_size):
        for name, value in zip(OUTPUTS, session.run(list(OUTPUTS), {"images": images[i : i + batch_size]})):
            parts[name].append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


@torch.no_grad()
def parity(model: MSFlow, session: Any, images: np.ndarray) -> tuple[dict[str, float], float]:
    """Max abs difference between ONNX Runtime and PyTorch per output, and the largest
    magnitude among the reference outputs."""
    ref = model(torch.from_numpy(images), paper_maps=False)
    got = run_onnx(session, images, batch_size=len(images))
    diffs = {k: float(np.abs(got[k] - ref[k].numpy()).max()) for k in OUTPUTS}
    return diffs, max(float(ref[k].abs().max()) for k in OUTPUTS)


def _validation_anomalies(validation: Path | None, category: str) -> list[Sample]:
    """The labelled anomalies of ``--validation`` (listed, not read: that is cheap and early)."""
    if validation is None:
        return []
    return [s for s in MVTecCategory(validation, category).test_samples() if s.label == 1]


def run_category(run: Path, train_cfg: dict[str, Any], category: str | None) -> str:
    """``category`` if given, else the one the run's config records; never a folder name of
    the run's path (``runs/<category>/<name>`` is a habit, not a rule: an imported run at
    ``/tmp/x/imports/off1`` became category ``imports``). Checked against the store's pattern."""
    if category is None:
        category = train_cfg.get("category") if isinstance(train_cfg, dict) else None
        if not category:
            raise ValueError(f"{run} records no category (a run trained on a plain folder, or imported): "
                             "pass --category NAME")
    if not isinstance(category, str) or not CATEGORY_PATTERN.fullmatch(category):
        raise ValueError(f"category {category!r} must match {CATEGORY_PATTERN.pattern}")
    return category


def check_export_settings(policy: str, target_fpr: float, target_recall: float | None, score_output: str,
                          validation: Path | None, map_sigma: float | None, version: str | None,
                          tensorrt: bool, trt_batches: tuple[int, int, int]) -> None:
    """ValueError for a setting that would fail the export after its work (the graph, the
    calibration scores), so that it fails in a second instead."""
    if score_output not in SCORE_OUTPUTS:
        raise ValueError(f"score_output must be one of {', '.join(SCORE_OUTPUTS)}, got {score_output!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not (isinstance(target_fpr, (int, float)) and 0.0 <= target_fpr < 1.0):  # NaN fails too
        raise ValueError(f"--target-fpr must be in [0, 1), got {target_fpr}")
    if target_recall is not None and not (isinstance(target_recall, (int, float)) and 0.0 < target_recall <= 1.0):
        raise ValueError(f"--target-recall must be in (0, 1], got {target_recall}")
    if policy == "target_recall" and target_recall is None:
        raise ValueError("--policy target_recall needs --target-recall (the share of labelled anomalies to flag)")
    if policy != "target_fpr" and validation is None:
        raise ValueError(f"--policy {policy} needs labelled anomalous images: --validation DIR")
    if validation is not None and not validation.is_dir():
        raise ValueError(f"--validation: folder not found: {validation}")
    if map_sigma is not None:
        try:
            with_map_sigma(MSFlowConfig(), map_sigma)
        except ValueError:
            raise ValueError(f"--map-sigma must be between 0 and 32 (input pixels), got {map_sigma}") from None
    if version is not None:
        check_version_name(version)
    if tensorrt:
        from models.tensorrt_build import require_cuda, require_tensorrt

        low, opt, high = trt_batches
        if not 1 <= low <= opt <= high:
            raise ValueError(f"TensorRT batches: need 1 <= min <= opt <= max, got {low}, {opt}, {high}")
        require_tensorrt()
        require_cuda()


def same_export(category_dir: Path, checkpoint_hash: str, config: MSFlowConfig, source: CalibrationSource,
                policy: str, score_output: str, target_fpr: float, target_recall: float | None,
                anomalies: int) -> list[str]:
    """Versions of ``category_dir`` exported (not recalibrated) from the same checkpoint, with
    the same model settings and calibrated the same way on the same images: what this export
    would make again."""
    found = []
    for v in list_versions(category_dir):
        try:
            m = Manifest.read(category_dir / v)
        except ManifestError:
            continue
        cal = m.calibration
        if (m.source_checkpoint_sha256 == checkpoint_hash and m.recalibrated_from is None
                and m.model == config.model_dump(mode="json") and cal.method == policy
                and cal.score_output == score_output and cal.source is not None
                and (cal.source.kind, cal.source.digest) == (source.kind, source.digest)
                and cal.anomalous_images == anomalies
                and cal.target_fpr == (target_fpr if policy == "target_fpr" else None)
                and cal.target_recall == (target_recall if policy == "target_recall" else None)):
            found.append(v)
    return found


def _remove_if_empty(category_dir: Path) -> None:
    """A category folder this export made, left with nothing (or only the lock): removed."""
    try:
        if {p.name for p in category_dir.iterdir()} <= {LOCK_FILE}:
            (category_dir / LOCK_FILE).unlink(missing_ok=True)
            category_dir.rmdir()
    except OSError:  # another writer's files arrived meanwhile: theirs
        pass


def training_data(run: Path, train_cfg: dict[str, Any]) -> TrainingData:
    """What the run trained on, for the manifest: normals, and how many came from reviews."""
    train_images = None
    log_path = run / "train_log.jsonl"
    if log_path.is_file():
        starts = [json.loads(line) for line in log_path.read_text().splitlines() if '"start"' in line]
        train_images = starts[-1].get("train_images") if starts else None
    store = train_cfg.get("include_reviewed_ok")
    return TrainingData(train_images=train_images, reviewed_ok_images=int(train_cfg.get("reviewed_ok_images") or 0),
                        review_store=str(store) if store else None)


def export_run(run: str | Path, store: str | Path, category: str | None = None,
               validation: str | Path | None = None, score_output: str = DEFAULT_SCORE_OUTPUT,
               tensorrt: bool = False, trt_batches: tuple[int, int, int] = (1, 8, 32),
               version: str | None = None, calibration_images: str | Path | None = None,
               policy: Policy = "target_fpr", target_fpr: float = DEFAULT_TARGET_FPR,
               target_recall: float | None = None, map_sigma: float | None = None,
               warn: Callable[[str], None] | None = None) -> Path:
    """Export a run into ``store/<category>/<version>/`` and return that folder. ``warn``
    takes what the user should know and the export goes on with (default: a
    :class:`DuplicateExportWarning`, or :class:`StaleReportWarning`, through :mod:`warnings`)."""
    # Absolute: the manifest records the run (the torch engine, bench, parity and
    # recalibrate's holdout fallback read it from anywhere).
    run = Path(run).expanduser().resolve()
    train_cfg = read_json(run / "config.json")
    category = run_category(run, train_cfg, category)
    validation = Path(validation).expanduser().resolve() if validation else None
    check_export_settings(policy, target_fpr, target_recall, score_output, validation, map_sigma, version,
                          tensorrt, trt_batches)
    store = Path(store).expanduser().resolve()
    if store.exists() and not store.is_dir():
        raise NotADirectoryError(f"model store {store} is not a folder")
    category_dir = store / category
    if version is not None and (category_dir / version).exists():
        raise FileExistsError(f"{category_dir / version} already exists")  # before the work; checked again at the end
    anomaly_samples = _validation_anomalies(validation, category)
    if policy != "target_fpr" and not anomaly_samples:
        raise ValueError(f"--policy {policy} needs labelled anomalous images, and {validation} has none for "
                         f"{category} (test/<defect> folders)")
    samples, source = calibration_samples(run, Path(calibration_images).expanduser() if calibration_images else None)

    # Hashed before it is loaded: a checkpoint replaced in between then fails the torch
    # engine's check (service/engines/torch.py) instead of passing it.
    checkpoint_hash = checkpoint_sha256(run)
    report, stale = eval_report(run, checkpoint_hash, category)
    if stale is not None:
        _warn(warn, stale, StaleReportWarning)
    model, info = load_model(run, "cpu")
    if map_sigma is not None:
        model.set_map_sigma(map_sigma)
    size = model.config.input_size
    normals = load_images(samples, size)
    anomalies = load_images(anomaly_samples, size) if anomaly_samples else None
    for v in same_export(category_dir, checkpoint_hash, model.config, source, policy, score_output, target_fpr,
                         target_recall, len(anomaly_samples)):
        line = (f"version {v} of {category} in {store} was exported from the same checkpoint (sha256 "
                f"{checkpoint_hash[:12]}...) and calibrated the same way on the same {source.count} normals "
                f"({source.kind}): this export makes a duplicate of it")
        _warn(warn, line, DuplicateExportWarning)

    made_category = not category_dir.exists()
    category_dir.mkdir(parents=True, exist_ok=True)
    staging = new_staging(category_dir, ".export-")  # held: a later export removes it if this one dies
    work = staging.path
    try:
        onnx_path = export_onnx(model, work / "model.onnx")
        session = onnx_session(onnx_path)

        diffs, scale = parity(model, session, normals[: min(4, len(normals))])
        # float32 rounding grows with magnitude: barely trained flows give maps in the
        # hundreds, so the tolerance is relative above 1.
        # A NaN compares False with everything: a broken output would pass as parity.
        if not all(math.isfinite(d) for d in diffs.values()) or max(diffs.values()) > PARITY_TOLERANCE * max(1.0, scale):
            raise ExportError(f"ONNX Runtime differs from PyTorch by {diffs} (tolerance {PARITY_TOLERANCE} "
                              f"x max(1, {scale:.3g}))")

        normal = run_onnx(session, normals)
        anomalous_scores = run_onnx(session, anomalies)[score_output] if anomalies is not None else None
        calibration = calibrate(normal[score_output], normal["anomaly_map"], score_output, anomalous_scores,
                                policy=policy, target_fpr=target_fpr, target_recall=target_recall, source=source)

        metrics = None
        if report is not None:  # eval's report of these weights, its figures shown by the service console
            shutil.copy(run / REPORT, work / REPORT)
            metrics = {k: report.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "best_f1")}
            metrics["absolute"] = report.get("absolute")
            for picture in ("roc.png", "examples.png"):
                if (run / picture).is_file():
                    shutil.copy(run / picture, work / picture)
        if (run / REVIEWED_OK).is_file():  # recalibration leaves these out of the known goods
            shutil.copy(run / REVIEWED_OK, work / REVIEWED_OK)

        import onnx

        tensorrt_info = None
        if tensorrt:
            from models.tensorrt_build import build_plan

            tensorrt_info = build_plan(work / "model.onnx", work / "model.plan", size, *trt_batches)

        files = {p.name: file_entry(p) for p in sorted(work.iterdir())
                 if p.is_file() and not p.name.startswith(".")}  # not the staging's lock

        def write_manifest(chosen: str) -> None:
            Manifest(
                category=category, version=chosen, created_at=datetime.now(timezone.utc), input_size=size,
                backbone=model.config.backbone, model=model.config.model_dump(),
                inputs=[TensorSpec(name="images", dtype="uint8", shape=["batch", size, size, 3])],
                outputs=[TensorSpec(name=n, dtype="float32",
                                    shape=["batch"] if n != "anomaly_map" else ["batch", size, size])
                         for n in OUTPUTS],
                calibration=calibration, metrics=metrics,
                onnx=OnnxInfo(opset=OPSET, exporter="torch.onnx.export(dynamo=True)",
                              torch_version=torch.__version__, onnx_version=onnx.__version__,
                              parity_max_abs_diff=diffs),
                tensorrt=tensorrt_info, files=files, source_run=str(run), training=training_data(run, train_cfg),
                source_checkpoint_sha256=checkpoint_hash,
            ).write(work)

        final = publish_version(category_dir, work, version, write_manifest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if made_category:
            _remove_if_empty(category_dir)
        raise
    finally:
        staging.close()
    log.info("exported %s version %s to %s", category, final.name, final)
    return final
