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


LABELS = ("ok", "ng")
VERDICTS = ("ok", "review", "ng")


def review_table(labels: Sequence[str], scores: np.ndarray, ok_bound: float, ng_bound: float) -> dict[str, Any]:
    """Operator labels (``"ok"``/``"ng"``) against the three-way verdict at two bounds.

    Returns ``{"ok_bound", "ng_bound", "confusion": {label: {verdict: n}}, "ok": {n, flagged,
    fpr}, "ng": {n, detected, recall, recall_lower_95}, "agreement": {n, agree}}``. "Flagged"
    and "detected" are ``score >= ok_bound`` (``is_anomalous``: review or ng); agreement is
    that binary call against the label, the figure the console and the metrics count.
    """
    s = np.asarray(scores, dtype=np.float64)
    lab = np.asarray([str(x) for x in labels], dtype=object)
    if s.shape != lab.shape:
        raise ValueError(f"one label per score ({s.size} scores, {lab.size} labels)")
    if set(lab) - set(LABELS):
        raise ValueError(f"labels must be 'ok' or 'ng', got {sorted(set(lab) - set(LABELS))}")
    ng_bound = max(ng_bound, ok_bound)
    verdict = np.where(s < ok_bound, "ok", np.where(s >= ng_bound, "ng", "review"))
    confusion = {label: {v: int(((lab == label) & (verdict == v)).sum()) for v in VERDICTS} for label in LABELS}
    flagged = s >= ok_bound
    n_ok, n_ng = int((lab == "ok").sum()), int((lab == "ng").sum())
    false_alarms = int((flagged & (lab == "ok")).sum())
    detected = int((flagged & (lab == "ng")).sum())
    return {
        "ok_bound": float(ok_bound), "ng_bound": float(ng_bound), "confusion": confusion,
        "ok": {"n": n_ok, "flagged": false_alarms, "fpr": false_alarms / n_ok if n_ok else None},
        "ng": {"n": n_ng, "detected": detected, "recall": detected / n_ng if n_ng else None,
               "recall_lower_95": recall_lower_bound(detected, n_ng) if n_ng else None},
        "agreement": {"n": int(s.size), "agree": int((flagged == (lab == "ng")).sum())},
    }


def recall_lower_bound(detected: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound on a recall seen as ``detected`` of ``n``."""
    from scipy.stats import beta

    if n <= 0 or detected <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, detected, n - detected + 1))
