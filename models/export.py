"""`msflow export`: a run -> a self-contained engine version in the model store.

The graph is ONE ONNX model from uint8 NHWC pixels to the answer (normalisation,
backbone, flows, fusion, upsampling, aggregation, top-k), with a dynamic batch axis.
Export checks parity against PyTorch before anything is written, calibrates on normals the
flows never trained on (:func:`models.calibrate.calibration_samples`) with the exported graph itself (so the thresholds are those of the engine that
will serve), and writes the version folder atomically.
"""

from __future__ import annotations

import json
import math
import logging
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.calibrate import DEFAULT_TARGET_FPR, Policy, calibrate, calibration_samples
from models.data import MVTecCategory, load_images
from models.manifest import CATEGORY_PATTERN, Manifest, OnnxInfo, TensorSpec, TrainingData, file_entry
from models.publish import check_version_name, publish_version
from models.review_store import REVIEWED_OK
from models.msflow import MSFlow
from models.runs import checkpoint_sha256, load_model, read_json

log = logging.getLogger(__name__)

OUTPUTS = ("image_score", "image_score_log", "absolute_score", "anomaly_map")
OPSET = 20
DEFAULT_SCORE_OUTPUT = "image_score_log"
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


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


def _validation_anomalies(validation: Path | None, category: str, size: int) -> np.ndarray | None:
    if validation is None:
        return None
    samples = [s for s in MVTecCategory(validation, category).test_samples() if s.label == 1]
    return load_images(samples, size) if samples else None


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
               target_recall: float | None = None, map_sigma: float | None = None) -> Path:
    """Export a run into ``store/<category>/<version>/`` and return that folder."""
    run = Path(run)
    train_cfg = read_json(run / "config.json")
    category = category or train_cfg.get("category") or run.parent.name
    if not CATEGORY_PATTERN.match(category):
        raise ValueError(f"category {category!r} must match {CATEGORY_PATTERN.pattern}")
    if score_output not in ("image_score_log", "absolute_score"):
        raise ValueError("score_output must be image_score_log or absolute_score")
    # Hashed before it is loaded: a checkpoint replaced in between then fails the torch
    # engine's check (service/engines/torch.py) instead of passing it.
    checkpoint_hash = checkpoint_sha256(run)
    model, info = load_model(run, "cpu")
    if map_sigma is not None:
        model.set_map_sigma(map_sigma)
    size = model.config.input_size

    category_dir = Path(store) / category
    category_dir.mkdir(parents=True, exist_ok=True)
    if version is not None and (category_dir / check_version_name(version)).exists():
        raise FileExistsError(f"{category_dir / version} already exists")  # before the work; checked again at the end
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=category_dir))
    try:
        onnx_path = export_onnx(model, work / "model.onnx")
        session = onnx_session(onnx_path)

        samples, source = calibration_samples(run, Path(calibration_images) if calibration_images else None)
        normals = load_images(samples, size)
        diffs, scale = parity(model, session, normals[: min(4, len(normals))])
        # float32 rounding grows with magnitude: barely trained flows give maps in the
        # hundreds, so the tolerance is relative above 1.
        # A NaN compares False with everything: a broken output would pass as parity.
        if not all(math.isfinite(d) for d in diffs.values()) or max(diffs.values()) > PARITY_TOLERANCE * max(1.0, scale):
            raise ExportError(f"ONNX Runtime differs from PyTorch by {diffs} (tolerance {PARITY_TOLERANCE} "
                              f"x max(1, {scale:.3g}))")

        normal = run_onnx(session, normals)
        anomalies = _validation_anomalies(Path(validation) if validation else None, category, size)
        anomalous_scores = run_onnx(session, anomalies)[score_output] if anomalies is not None else None
        calibration = calibrate(normal[score_output], normal["anomaly_map"], score_output, anomalous_scores,
                                policy=policy, target_fpr=target_fpr, target_recall=target_recall, source=source)

        report_path = run / "report.json"
        metrics = None
        if report_path.is_file():
            shutil.copy(report_path, work / "report.json")
            report = json.loads(report_path.read_text())
            metrics = {k: report.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "best_f1")}
            metrics["absolute"] = report.get("absolute")
        if (run / REVIEWED_OK).is_file():  # recalibration leaves these out of the known goods
            shutil.copy(run / REVIEWED_OK, work / REVIEWED_OK)
        for picture in ("roc.png", "examples.png"):  # `msflow eval`'s figures, shown by the service console
            if (run / picture).is_file():
                shutil.copy(run / picture, work / picture)

        import onnx

        tensorrt_info = None
        if tensorrt:
            from models.tensorrt_build import build_plan

            tensorrt_info = build_plan(work / "model.onnx", work / "model.plan", size, *trt_batches)

        files = {p.name: file_entry(p) for p in sorted(work.iterdir()) if p.is_file()}

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
        raise
    log.info("exported %s version %s to %s", category, final.name, final)
    return final
