"""Markdown tables of `msflow eval` reports, for docs/RESULTS.md.

    python scripts/results_table.py runs/demo/brick runs/demo/grass runs/demo/gravel
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TYPES = ("scratch", "stain", "hole", "foreign")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _train_seconds(run: Path) -> str:
    log = run / "train_log.jsonl"
    if not log.is_file():
        return "-"
    done = [json.loads(line) for line in log.read_text().splitlines() if '"event": "done"' in line]
    return f"{done[-1]['seconds']:.0f}" if done else "-"


def main(runs: list[str]) -> None:
    print("| category | image AUROC | pixel AUROC | AUPRO@30% | best F1 | abs. image AUROC | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    reports = []
    for run in map(Path, runs):
        r = json.loads((run / "report.json").read_text())
        reports.append(r)
        print(f"| {r['category']} | {_f(r['image_auroc'])} | {_f(r['pixel_auroc'])} | {_f(r['aupro'])} | "
              f"{_f(r['best_f1'])} | {_f(r['absolute']['image_auroc'])} | {_train_seconds(run)} |")
    print()
    print("| category | " + " | ".join(f"{t} image / pixel AUROC" for t in TYPES) + " |")
    print("| --- | " + " | ".join("---" for _ in TYPES) + " |")
    for r in reports:
        cells = [f"{_f(r['per_defect_type'][t]['image_auroc'])} / {_f(r['per_defect_type'][t]['pixel_auroc'])}"
                 for t in TYPES]
        print(f"| {r['category']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
