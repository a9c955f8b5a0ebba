"""`msflow eval`: score a run on its category's test set and write report.json + pictures.

Metrics follow the paper: image AUROC on the image score, pixel AUROC on the "add" map,
AUPRO (up to 30% FPR) on the "mul" map. The absolute anomaly map that the service shows is
evaluated too, because it is what operators see. Where the data set records visibility
tiers (the demo data), every figure is also given per tier.

Ranking is not a verdict, so the report also says what happens at one threshold
(:mod:`models.verdicts`): a given raw threshold, an exported version's, or by default the
threshold ``msflow export`` would calibrate (same normals, same policy), so the figures
match what the server will answer.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.atomic_files import write_atomic
from models.calibrate import DEFAULT_TARGET_FPR, calibrate, calibration_samples
from models.data import MVTecCategory
from models.data_loading import load_images, load_masks
from models.devices import torch_device
from models.manifest import CalibrationSource, Manifest
from models.metrics import aupro, image_auroc, pixel_auroc
from models.metrics_report import evaluate_predictions, metrics_by_group
from models.msflow import MSFlow
from models.report_plots import plot_example_grid, plot_roc_curves, plot_score_distributions
from models.runs import checkpoint_sha256, load_model, read_json
from models.verdicts import verdict_table

SCORE_OUTPUT = "image_score_log"  # what export thresholds by default

PREDICTION_KEYS = ("image_score", "image_score_log", "absolute_score", "anomaly_map", "score_map", "pixel_map")


@torch.no_grad()
def predict(model: MSFlow, images: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 16,
            keys: tuple[str, ...] = PREDICTION_KEYS, progress: bool = True) -> dict[str, np.ndarray]:
    """Run the whole model over uint8 images ``[N,S,S,3]``; numpy outputs by name."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i in tqdm(range(0, len(images), batch_size), desc="predict", leave=False, disable=not progress):
        result = model(torch.from_numpy(images[i : i + batch_size]).to(device))
        for k in keys:
            out[k].append(result[k].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def check_version_matches_run(version: Path, run: Path, train_cfg: dict[str, Any]) -> Manifest:
    """The manifest of ``version``, when its threshold may be applied to this run's scores.

    A raw threshold only means something on the scores of the weights it was calibrated on:
    another model's (another category's, or this run before a retraining) puts the line
    anywhere (evaluated against another brick model, every defect read as "missed"). The
    manifest records the sha256 of the exported checkpoint.pt (recalibrated versions keep
    it), so a mismatch is refused. A manifest from before that field cannot be checked: a
    version of another category that names another run is refused, anything else warned about.
    """
    manifest = Manifest.read(version)  # ManifestError (a ValueError) for a folder that is no version
    if manifest.source_checkpoint_sha256 is not None:
        ours = checkpoint_sha256(run)
        if ours != manifest.source_checkpoint_sha256:
            raise ValueError(
                f"version {version} ({manifest.category}) was exported from another checkpoint than {run} "
                f"(sha256 {manifest.source_checkpoint_sha256[:12]}... of {manifest.source_run}, not {ours[:12]}...): "
                "its threshold is on another model's score scale; give --threshold for a raw value instead")
        return manifest
    same_run = manifest.source_run is not None and Path(manifest.source_run).resolve() == run.resolve()
    run_category = train_cfg.get("category")
    if not same_run and run_category is not None and manifest.category != run_category:
        raise ValueError(f"version {version} is of category {manifest.category!r} (run {manifest.source_run}), "
                         f"{run} of {run_category!r}: its threshold is on another model's score scale; "
                         "give --threshold for a raw value instead")
    warnings.warn(f"version {version} does not record which checkpoint it was exported from (an older export): "
                  f"its threshold is applied to {run} unchecked", stacklevel=3)
    return manifest


def _calibration_normals(run: Path, size: int) -> tuple[np.ndarray, CalibrationSource]:
    """The normals ``msflow export`` would calibrate ``run`` on, read (not yet predicted).

    Read with the test set, before its prediction: a calibration image that cannot be read
    (truncated, a format the server refuses) stopped eval only after the whole test set was
    predicted, minutes on a real set, with nothing written."""
    try:
        samples, source = calibration_samples(run)
    except ValueError as exc:  # eval has two other ways to a threshold, which export has not
        raise ValueError(f"{exc}; or judge the test set at a threshold of your own: msflow eval --threshold RAW, "
                         "or --version of an exported model") from exc
    return load_images(samples, size), source


def _threshold(model: MSFlow, device: str, batch_size: int, threshold: float | None,
               version: Path | None, target_fpr: float, manifest: Manifest | None = None,
               normals: tuple[np.ndarray, CalibrationSource] | None = None) -> tuple[float, str, dict[str, Any]]:
    """(raw threshold, score output, where it came from) for the verdict table; ``normals``
    (:func:`_calibration_normals`) where neither a threshold nor a version gives it."""
    if threshold is not None:
        return float(threshold), SCORE_OUTPUT, {"kind": "given"}
    if version is not None:
        cal = (manifest or Manifest.read(version)).calibration
        return cal.threshold, cal.score_output, {"kind": "exported", "version": str(version), "method": cal.method}
    if normals is None:
        raise ValueError("no threshold, version or calibration normals to take the verdict threshold from")
    images, source = normals
    normal = predict(model, images, device, batch_size, keys=(SCORE_OUTPUT, "anomaly_map"), progress=False)
    cal = calibrate(normal[SCORE_OUTPUT], normal["anomaly_map"], SCORE_OUTPUT, target_fpr=target_fpr, source=source)
    return cal.threshold, SCORE_OUTPUT, {"kind": "calibrated as export does", "method": cal.method,
                                         "target_fpr": target_fpr, "fpr_calibration": cal.fpr_calibration,
                                         "fpr_upper_95": cal.fpr_upper_95, "calibration": source.model_dump()}


def _served_map_block(masks: np.ndarray, maps: np.ndarray, select: np.ndarray) -> dict[str, float | None]:
    m, a = masks[select], maps[select]
    if not m.any() or m.all():
        return {"pixel_auroc": None, "aupro": None}
    return {"pixel_auroc": pixel_auroc(m, a), "aupro": aupro(m, a)}


def evaluate_run(run: str | Path, data: str | Path | None = None, category: str | None = None,
                 device: str = "cpu", batch_size: int = 16, pictures: bool = True,
                 progress: bool = True, threshold: float | None = None, version: str | Path | None = None,
                 target_fpr: float = DEFAULT_TARGET_FPR) -> dict[str, Any]:
    """Evaluate a run's selected checkpoint; writes ``report.json`` (and PNGs) into the run.

    The verdict threshold is ``threshold`` (raw), else ``version``'s exported one, else
    calibrated as ``msflow export`` would (``target_fpr`` on the run's calibration normals).
    """
    run = Path(run)
    # Everything a user can get wrong is checked here, before the minute of prediction.
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    if threshold is not None and version:
        raise ValueError("give a threshold or a version to take it from, not both")
    device = str(torch_device(device))
    train_cfg = read_json(run / "config.json")
    if not isinstance(train_cfg, dict):
        raise ValueError(f"{run / 'config.json'} is not a run config (a JSON object)")
    exported = check_version_matches_run(Path(version), run, train_cfg) if version else None
    data = data or train_cfg.get("data")
    category = category or train_cfg.get("category")
    if data is None or category is None:
        raise ValueError(f"{run} does not name an MVTec-layout test set (plain-folder or imported run): "
                         "give --data and --category")
    data = Path(data)
    weights = checkpoint_sha256(run)  # before loading, as export hashes it: which weights this report is of
    model, info = load_model(run, device)
    size = model.config.input_size

    samples = MVTecCategory(data, category).test_samples()
    images = load_images(samples, size)
    masks = load_masks(samples, size)
    normals = _calibration_normals(run, size) if threshold is None and not version else None
    labels = np.array([s.label for s in samples])
    types = [s.defect_type for s in samples]
    tiers = [s.tier for s in samples]
    has_tiers = any(t is not None for t, s in zip(tiers, samples) if s.label == 1)

    start = time.perf_counter()
    pred = predict(model, images, device, batch_size, progress=progress)
    seconds = time.perf_counter() - start

    # The log form ranks exactly like the paper score but never saturates at 1.0.
    report = evaluate_predictions(labels, pred["image_score_log"], masks, pred["pixel_map"], types,
                                  pro_maps=pred["score_map"])
    good = labels == 0
    report["absolute"] = {
        "image_auroc": _image_auroc_or_none(labels, pred["absolute_score"]),
        **_served_map_block(masks, pred["anomaly_map"], np.ones_like(good)),
    }
    if has_tiers:
        tier_names = [t or "unknown" for t in tiers]
        report["per_tier"] = metrics_by_group(labels, pred["image_score_log"], masks, pred["pixel_map"], tier_names,
                                              pro_maps=pred["score_map"])
        for tier, block in report["per_tier"].items():
            select = good | (np.array(tier_names, dtype=object) == tier) & (labels == 1)
            block["absolute"] = {"image_auroc": _image_auroc_or_none(labels[select], pred["absolute_score"][select]),
                                 **_served_map_block(masks, pred["anomaly_map"], select)}
        pairs = [f"{d}/{t}" for d, t in zip(types, tier_names)]
        report["per_defect_type_and_tier"] = metrics_by_group(labels, pred["image_score_log"], None, None, pairs)

    raw_threshold, score_output, origin = _threshold(model, device, batch_size, threshold,
                                                     Path(version) if version else None, target_fpr, exported,
                                                     normals)
    report["verdict"] = {"score_output": score_output, "threshold_source": origin,
                         **verdict_table(labels, pred[score_output], raw_threshold, types,
                                         tiers if has_tiers else None)}
    report["paper_score_saturated"] = bool(np.mean(pred["image_score"] >= 1.0) > 0.5)
    report.update(
        category=category,
        run=str(run),
        checkpoint_epoch=info.get("epoch"),
        checkpoint_sha256=weights,  # export takes the report of the weights it exports only
        model=model.config.model_dump(),
        images_per_second=len(images) / seconds,
        device=str(device),
    )
    write_atomic(run / "report.json", json.dumps(report, indent=2))
    np.savez_compressed(run / "test_scores.npz", labels=labels, defect_types=np.array(types),
                        tiers=np.array([t or "" for t in tiers]),
                        image_score_log=pred["image_score_log"], absolute_score=pred["absolute_score"])
    if pictures:
        plot_roc_curves(labels, pred["image_score_log"], masks, pred["pixel_map"], run / "roc.png",
                        title=f"{category}: image and pixel ROC")
        lo, hi = np.percentile(pred["anomaly_map"][labels == 0], [1, 99.9]) if (labels == 0).any() else (None, None)
        plot_example_grid(images, masks, pred["anomaly_map"], pred["absolute_score"], labels, types,
                          run / "examples.png", vmin=lo, vmax=hi)
        groups = [t or "all" for t in tiers] if has_tiers else types
        plot_score_distributions(pred[score_output], labels, groups, raw_threshold, run / "scores.png",
                                 title=f"{category}: image scores at the verdict threshold", score_name=score_output)
    return report


def _image_auroc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """None where it is undefined (a test set of one class), as the main metrics report it."""
    return image_auroc(labels, scores) if 0 < int(np.sum(labels)) < len(labels) else None
