"""`msflow eval`: score a run on its category's test set and write report.json + pictures.

Metrics follow the paper: image AUROC on the image score, pixel AUROC on the "add" map,
AUPRO (up to 30% FPR) on the "mul" map. The absolute anomaly map that the service shows is
evaluated too, because it is what operators see.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models.data import MVTecCategory, load_images, load_masks
from models.metrics import evaluate_predictions, image_auroc, pixel_auroc
from models.msflow import MSFlow
from models.report_plots import plot_example_grid, plot_roc_curves
from models.runs import load_model, read_json

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


def evaluate_run(run: str | Path, data: str | Path | None = None, category: str | None = None,
                 device: str = "cpu", batch_size: int = 16, pictures: bool = True,
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate a run's selected checkpoint; writes ``report.json`` (and PNGs) into the run."""
    run = Path(run)
    train_cfg = read_json(run / "config.json")
    data = data or train_cfg.get("data")
    category = category or train_cfg.get("category")
    if data is None or category is None:
        raise ValueError(f"{run} does not name an MVTec-layout test set (plain-folder or imported run): "
                         "give --data and --category")
    data = Path(data)
    model, info = load_model(run, device)
    size = model.config.input_size

    samples = MVTecCategory(data, category).test_samples()
    images = load_images(samples, size)
    masks = load_masks(samples, size)
    labels = np.array([s.label for s in samples])
    types = [s.defect_type for s in samples]

    start = time.perf_counter()
    pred = predict(model, images, device, batch_size, progress=progress)
    seconds = time.perf_counter() - start

    # The log form ranks exactly like the paper score but never saturates at 1.0.
    report = evaluate_predictions(labels, pred["image_score_log"], masks, pred["pixel_map"], types,
                                  pro_maps=pred["score_map"])
    report["absolute"] = {
        "image_auroc": image_auroc(labels, pred["absolute_score"]),
        "pixel_auroc": pixel_auroc(masks, pred["anomaly_map"]),
    }
    report["paper_score_saturated"] = bool(np.mean(pred["image_score"] >= 1.0) > 0.5)
    report.update(
        category=category,
        run=str(run),
        checkpoint_epoch=info.get("epoch"),
        model=model.config.model_dump(),
        images_per_second=len(images) / seconds,
        device=str(device),
    )
    (run / "report.json").write_text(json.dumps(report, indent=2))
    np.savez_compressed(run / "test_scores.npz", labels=labels, defect_types=np.array(types),
                        image_score_log=pred["image_score_log"], absolute_score=pred["absolute_score"])
    if pictures:
        plot_roc_curves(labels, pred["image_score_log"], masks, pred["pixel_map"], run / "roc.png",
                        title=f"{category}: image and pixel ROC")
        lo, hi = np.percentile(pred["anomaly_map"][labels == 0], [1, 99.9]) if (labels == 0).any() else (None, None)
        plot_example_grid(images, masks, pred["anomaly_map"], pred["absolute_score"], labels, types,
                          run / "examples.png", vmin=lo, vmax=hi)
    return report

