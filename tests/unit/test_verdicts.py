"""Verdicts at one threshold and calibration policies, on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibrate import calibrate, fpr_upper_bound, threshold_for_fpr, threshold_for_recall
from models.verdicts import verdict_table


def test_verdict_table_counts_a_constructed_case() -> None:
    # 5 good (one above the threshold), 6 defective: scratch visible/subtle, hole visible.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.95, 0.2, 0.6, 0.5, 0.7, 0.8])
    types = ["good"] * 5 + ["scratch", "scratch", "scratch", "scratch", "hole", "hole"]
    tiers = [None] * 5 + ["visible", "subtle", "subtle", "visible", "visible", "visible"]
    t = verdict_table(labels, scores, 0.55, types, tiers)
    assert t["good"] == {"n": 5, "false_alarms": 1, "fpr": 0.2, "fpr_upper_95": pytest.approx(fpr_upper_bound(1, 5))}
    assert t["confusion"] == {"good": {"ok": 4, "ng": 1}, "defective": {"ok": 2, "ng": 4}}
    assert t["defective"] == {"n": 6, "detected": 4, "missed": 2, "recall": 4 / 6}
    assert t["per_defect_type"]["hole"] == {"n": 2, "detected": 2, "missed": 0, "recall": 1.0}
    assert t["per_defect_type"]["scratch"] == {"n": 4, "detected": 2, "missed": 2, "recall": 0.5}
    # scratch visible: 0.95 (hit), 0.5 (miss); subtle: 0.2 (miss), 0.6 (hit)
    assert t["per_tier"]["visible"] == {"n": 4, "detected": 3, "missed": 1, "recall": 0.75}
    assert t["per_tier"]["subtle"] == {"n": 2, "detected": 1, "missed": 1, "recall": 0.5}
    assert t["per_defect_type_and_tier"]["scratch/visible"]["detected"] == 1
    # a score exactly at the threshold is flagged (score >= threshold), like the server
    assert verdict_table(labels, scores, 0.9, types)["good"]["false_alarms"] == 1


def test_verdict_table_refuses_non_finite_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        verdict_table(np.array([0, 1]), np.array([0.1, np.nan]), 0.5, ["good", "hole"])


def test_target_fpr_threshold_and_its_uncertainty() -> None:
    normal = np.arange(100, dtype=float)  # 0..99
    t = threshold_for_fpr(normal, 0.05)  # at most 5 of 100 flagged: just above 94
    assert int((normal >= t).sum()) == 5 and t > 94
    assert int((normal >= threshold_for_fpr(normal, 0.0)).sum()) == 0
    cal = calibrate(normal, np.zeros((100, 4, 4)), "image_score_log", target_fpr=0.01)
    assert cal.method == "target_fpr" and cal.fpr_calibration == 0.01
    # Clopper-Pearson: 0 of 60 flagged still allows ~4.9% at 95%; 1 of 100 allows ~4.7%
    assert fpr_upper_bound(0, 60) == pytest.approx(1 - 0.05 ** (1 / 60), rel=1e-6)
    assert cal.fpr_upper_95 == pytest.approx(fpr_upper_bound(1, 100)) and 0.04 < cal.fpr_upper_95 < 0.05


def test_target_recall_needs_and_uses_labelled_anomalies() -> None:
    normal = np.linspace(0, 1, 50)
    anomalous = np.array([0.8, 1.5, 2.0, 3.0])
    assert threshold_for_recall(anomalous, 0.75) == 1.5  # one miss allowed
    cal = calibrate(normal, np.zeros((50, 2, 2)), "image_score_log", anomalous, policy="target_recall",
                    target_recall=1.0)
    assert cal.threshold == 0.8 and cal.recall_calibration == 1.0
    assert cal.fpr_calibration == pytest.approx(float((normal >= 0.8).mean()))
    with pytest.raises(ValueError, match="labelled anomalous"):
        calibrate(normal, np.zeros((50, 2, 2)), "image_score_log", policy="target_recall", target_recall=0.9)


def test_the_reported_score_is_on_the_verdicts_side_of_one_half() -> None:
    """A client reading ``score >= 0.5`` agrees with ``is_anomalous`` even within rounding of
    the threshold (1e-7 under it rounded to 0.5 with an ok verdict)."""
    from models.manifest import Calibration, ScoreStats

    cal = Calibration(score_output="image_score", method="target_fpr", threshold=1.7569914864, score_min=1.0,
                      score_max=3.0, map_low=0.0, map_high=1.0, pixel_threshold=0.5,
                      normal_scores=ScoreStats(count=10, mean=1.0, std=0.1, min=0.8, p50=1.0, p95=1.2, p99=1.3,
                                               max=1.4))
    just_under = cal.threshold - 1e-7
    assert round(cal.normalise_score(just_under), 6) == 0.5  # what the answer said before
    assert cal.verdict(just_under) == "ok" and cal.reported_score(just_under) < 0.5
    assert cal.reported_score(cal.threshold) == 0.5 and cal.verdict(cal.threshold) != "ok"
    assert cal.reported_score(cal.threshold + 1e-9) >= 0.5
    for raw in np.linspace(0.0, 4.0, 2001):
        assert (cal.reported_score(raw) >= 0.5) == (raw >= cal.threshold)
        assert cal.reported_score(raw) == pytest.approx(cal.normalise_score(raw), abs=1.1e-6)
