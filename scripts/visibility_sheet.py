"""A contact sheet of generated defects at 100% zoom, to choose and check the visibility cut-offs.

    python scripts/visibility_sheet.py --category grass --out reports/visibility-grass.png

Rows: defect type x recipe; columns: independent draws on clean crops of the test strip.
Each tile's measured visibility and tier are printed (the sheet shows no masks: look for
the defect as an inspector would, then compare with the printout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from models.defects import DEFECT_TYPES, RECIPES, synthesize_defect
from models.demo_data import DEFAULT_CROP, TEXTURES, CropSpec, extract_crop, load_texture, plan_regions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="grass", choices=TEXTURES)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", default="reports/visibility-sheet.png")
    args = parser.parse_args()

    photo = load_texture(args.category)
    foreign = [load_texture(t) for t in TEXTURES if t != args.category]
    test = plan_regions(*photo.shape, DEFAULT_CROP, args.category)["test"]
    rows = []
    for defect in DEFECT_TYPES:
        for recipe in RECIPES:
            tiles, seen = [], []
            for i in range(args.columns):
                rng = np.random.default_rng(args.seed + i)
                spec = CropSpec(int(rng.integers(test.top, test.bottom - DEFAULT_CROP + 1)), test.left, 0)
                image, _, params = synthesize_defect(extract_crop(photo, spec, DEFAULT_CROP), defect, rng, foreign,
                                                     recipe=recipe)
                tiles.append(np.pad(image, 4, constant_values=255))
                seen.append(f"{params['visibility']:.2f} {params['tier'][0]}")
            rows.append(np.concatenate(tiles, axis=1))
            print(f"{defect:>8} {recipe:>8}: " + "  ".join(seen))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    print(f"sheet: {out}")


if __name__ == "__main__":
    main()
