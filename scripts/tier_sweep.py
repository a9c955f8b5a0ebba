"""Quick-recipe comparison of model settings per visibility tier (docs/RESULTS.md).

    python scripts/tier_sweep.py grass in256 256 avg [efficientnet_lite2]

Trains CATEGORY of data/demo with the quick recipe (lr 1e-3, 24 sub-epochs) into
runs/sweep/CATEGORY-NAME (reused when it exists), scores the test set, and appends one JSON
line to reports/sweep.jsonl: image AUROC (served absolute score at smoothing sigma 0/2/4,
and image_score_log) and served-map pixel AUROC, per tier.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from models.data import MVTecCategory
from models.data_loading import load_images, load_masks
from models.evaluate import predict
from models.metrics import image_auroc, pixel_auroc
from models.msflow import MSFlowConfig
from models.runs import load_model
from models.train import TrainConfig, train


def main(category: str, name: str, size: int, pool: str, backbone: str = "efficientnet_lite0") -> None:
    torch.set_num_threads(2)
    out = Path(f"runs/sweep/{category}-{name}")
    started = time.time()
    if not (out / "checkpoint.pt").exists():
        cfg = TrainConfig(data=Path("data/demo"), category=category, out=out,
                          model=MSFlowConfig(input_size=size, pool=pool, backbone=backbone, map_sigma=0.0),
                          lr=1e-3, meta_epochs=6, sub_epochs=4, warmup_meta_epochs=1, decay_milestones=(16, 21),
                          batch_size=8, holdout_fraction=0.1, seed=0, device="cpu")
        train(cfg, progress=False)
    result: dict[str, object] = {"cat": category, "name": name, "train_s": round(time.time() - started)}
    model, _ = load_model(out, "cpu")
    samples = MVTecCategory("data/demo", category).test_samples()
    images, masks = load_images(samples, size), load_masks(samples, size)
    pred = predict(model, images, "cpu", 16, keys=("image_score_log", "anomaly_map"), progress=False)
    labels = np.array([s.label for s in samples])
    tiers = np.array([s.tier or "good" for s in samples])
    k = max(1, int(size * size * model.config.top_k))
    for sigma in (0, 2, 4):
        maps = pred["anomaly_map"] if sigma == 0 else np.stack(
            [ndimage.gaussian_filter(a, sigma * size / 256) for a in pred["anomaly_map"]])
        served = np.sort(maps.reshape(len(maps), -1), 1)[:, -k:].mean(1)
        for tier in ("visible", "subtle"):
            sel = (labels == 0) | (tiers == tier)
            result[f"s{sigma}_{tier}_img"] = round(image_auroc(labels[sel], served[sel]), 3)
            result[f"s{sigma}_{tier}_pix"] = round(pixel_auroc(masks[sel], maps[sel]), 3)
    for tier in ("visible", "subtle"):
        sel = (labels == 0) | (tiers == tier)
        result[f"log_{tier}_img"] = round(image_auroc(labels[sel], pred["image_score_log"][sel]), 3)
    print(json.dumps(result))
    Path("reports").mkdir(exist_ok=True)
    with open("reports/sweep.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
