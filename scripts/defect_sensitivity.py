"""How much does each demo defect move a trained model? A paired measurement.

For every defective test image of a demo category, the clean crop it was made from is
rebuilt from `dataset.json` (same photograph, position and transform), and both are scored.
That separates two causes of a low AUROC: the model not seeing the defect at all (the
defective image scores no higher than its own clean crop), and normal test crops that
already look unusual (a score gap between good test crops and the holdout).

    python scripts/defect_sensitivity.py --run runs/demo/grass --data data/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.demo_data import CropSpec, extract_crop, load_texture
from models.preprocessing import resize_for_model
from models.runs import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", default="data/demo")
    args = p.parse_args()
    model, _ = load_model(args.run)
    category = json.loads((Path(args.run) / "config.json").read_text())["category"]
    root = Path(args.data) / category
    meta = json.loads((root / "dataset.json").read_text())
    photo = load_texture(category)
    size = model.config.input_size

    def score(gray: np.ndarray) -> tuple[float, np.ndarray]:
        rgb = resize_for_model(Image.fromarray(gray).convert("RGB"), size)
        with torch.no_grad():
            out = model(torch.from_numpy(rgb[None]), paper_maps=False)
        return float(out["image_score_log"][0]), out["anomaly_map"][0].numpy()

    rows: dict[str, list[tuple[float, float, float]]] = {}
    for entry in meta["images"]:
        parts = entry["file"].split("/")
        if parts[0] != "test" or parts[1] == "good":
            continue
        clean = extract_crop(photo, CropSpec(y=entry["y"], x=entry["x"], transform=entry["transform"]), meta["crop"])
        defective = np.asarray(Image.open(root / entry["file"]).convert("L"))
        mask_img = Image.open(root / "ground_truth" / parts[1] / parts[2].replace(".png", "_mask.png"))
        mask = np.asarray(mask_img.resize((size, size), Image.NEAREST)) > 0
        s_clean, m_clean = score(clean)
        s_def, m_def = score(defective)
        # Change of the anomaly map inside the defect, in units of the clean map's spread.
        lift = float((m_def[mask] - m_clean[mask]).mean() / (m_clean.std() + 1e-9)) if mask.any() else 0.0
        rows.setdefault(parts[1], []).append((s_clean, s_def, lift))

    print(f"{category}: paired clean vs defective crops ({args.run})")
    print(f"{'defect':>8} {'n':>3} {'score up':>9} {'mean Δscore':>12} {'map lift (σ)':>13}")
    for defect, vals in sorted(rows.items()):
        a = np.array(vals)
        print(f"{defect:>8} {len(a):>3} {np.mean(a[:, 1] > a[:, 0]):>9.0%} {np.mean(a[:, 1] - a[:, 0]):>12.3f} "
              f"{np.mean(a[:, 2]):>13.2f}")


if __name__ == "__main__":
    main()
