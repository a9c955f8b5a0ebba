"""What the line gets at one threshold: false alarms on good parts, missed defects, a confusion table.

Ranking metrics (AUROC, AUPRO) say whether a threshold *exists*; this module says what the
threshold that ships does. Every rate comes with its count, and the false-alarm rate with
its 95% upper bound, because 60 good parts cannot prove a 1% rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from models.calibrate import fpr_upper_bound


def _detection(flags: np.ndarray) -> dict[str, Any]:
    n = int(flags.size)
    hit = int(flags.sum())
    return {"n": n, "detected": hit, "missed": n - hit, "recall": hit / n if n else None}


def verdict_table(labels: np.ndarray, scores: np.ndarray, threshold: float, defect_types: Sequence[str],
                  tiers: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Verdicts ``score >= threshold`` against the labels (1 = defective).

    Returns ``{"threshold", "good": {n, false_alarms, fpr, fpr_upper_95}, "defective":
    {n, detected, missed, recall}, "confusion": {"good": {"ok", "ng"}, "defective": {"ok",
    "ng"}}, "per_defect_type": {type: {...}}, "per_tier": {tier: {...}},
    "per_defect_type_and_tier": {"type/tier": {...}}}``.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape or len(defect_types) != y.size:
        raise ValueError(f"labels, scores and defect types must have one entry per image ({y.size})")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity: no verdict can be made from them")
    flagged = s >= threshold
    types = np.asarray([str(t) for t in defect_types], dtype=object)
    tier_arr = np.asarray([str(t) if t else "unknown" for t in (tiers or [None] * y.size)], dtype=object)
    good, bad = y == 0, y == 1
    n_good, false_alarms = int(good.sum()), int((flagged & good).sum())
    table: dict[str, Any] = {
        "threshold": float(threshold),
        "good": {"n": n_good, "false_alarms": false_alarms, "fpr": false_alarms / n_good if n_good else None,
                 "fpr_upper_95": fpr_upper_bound(false_alarms, n_good) if n_good else None},
        "defective": _detection(flagged[bad]),
        "confusion": {"good": {"ok": n_good - false_alarms, "ng": false_alarms},
                      "defective": {"ok": int((~flagged & bad).sum()), "ng": int((flagged & bad).sum())}},
    }
    table["per_defect_type"] = {t: _detection(flagged[bad & (types == t)]) for t in sorted(set(types[bad]))}
    if tiers is not None:
        table["per_tier"] = {t: _detection(flagged[bad & (tier_arr == t)]) for t in sorted(set(tier_arr[bad]))}
        pairs = sorted({(t, r) for t, r in zip(types[bad], tier_arr[bad])})
        table["per_defect_type_and_tier"] = {
            f"{t}/{r}": _detection(flagged[bad & (types == t) & (tier_arr == r)]) for t, r in pairs
        }
    return table
