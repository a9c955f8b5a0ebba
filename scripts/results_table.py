"""Markdown tables of `msflow eval` reports, for docs/RESULTS.md.

    python scripts/results_table.py runs/demo/brick runs/demo/grass runs/demo/gravel
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TYPES = ("scratch", "stain", "hole", "foreign")
TIERS = ("visible", "subtle")


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _train_seconds(run: Path) -> str:
    log = run / "train_log.jsonl"
    if not log.is_file():
        return "-"
    done = [json.loads(line) for line in log.read_text().splitlines() if '"event": "done"' in line]
    return f"{done[-1]['seconds']:.0f}" if done else "-"


def main(runs: list[str]) -> None:
    reports = [(Path(run), json.loads((Path(run) / "report.json").read_text())) for run in runs]
    print("| category | tier | image AUROC | pixel AUROC | AUPRO@30% | served map: pixel AUROC / AUPRO | recall at threshold |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for _, r in reports:
        v = r["verdict"]
        for tier in TIERS:
            b = r.get("per_tier", {}).get(tier)
            if b is None:
                continue
            d = v.get("per_tier", {}).get(tier, {})
            print(f"| {r['category']} | {tier} | {_f(b['image_auroc'])} | {_f(b['pixel_auroc'])} | {_f(b['aupro'])} | "
                  f"{_f(b['absolute']['pixel_auroc'])} / {_f(b['absolute']['aupro'])} | "
                  f"{d.get('detected', '-')}/{d.get('n', '-')} ({_pct(d.get('recall'))}) |")
    print()
    print("| category | threshold (source) | false alarms on good test parts | FPR 95% bound | missed defects | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run, r in reports:
        v = r["verdict"]
        src = v["threshold_source"]
        where = src.get("calibration", {}).get("kind", src["kind"])
        print(f"| {r['category']} | {v['threshold']:.3f} ({where}) | {v['good']['false_alarms']}/{v['good']['n']} "
              f"({_pct(v['good']['fpr'])}) | {_pct(v['good']['fpr_upper_95'])} | "
              f"{v['defective']['missed']}/{v['defective']['n']} | {_train_seconds(run)} |")
    print()
    print("| category | " + " | ".join(f"{t} visible / subtle image AUROC" for t in TYPES) + " |")
    print("| --- | " + " | ".join("---" for _ in TYPES) + " |")
    for _, r in reports:
        pairs = r.get("per_defect_type_and_tier", {})
        cells = [" / ".join(_f(pairs.get(f"{t}/{tier}", {}).get("image_auroc")) for tier in TIERS) for t in TYPES]
        print(f"| {r['category']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
