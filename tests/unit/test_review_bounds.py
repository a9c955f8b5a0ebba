"""The two verdict bounds: the manifest's three-way verdict, the ng bound at export, the refit
from operator labels, and the before/after table, on constructed scores with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.calibrate import calibrate, fit_review_bounds, just_above, ng_bound
from models.manifest import DEFAULT_REVIEW_MARGIN, Calibration, ScoreStats
from models.verdicts import recall_lower_bound, review_table

STATS = ScoreStats(count=4, mean=1.0, std=0.1, min=0.8, p50=1.0, p95=1.2, p99=1.3, max=1.3)


def cal(**update: object) -> Calibration:
    base = Calibration(score_output="image_score_log", method="target_fpr", threshold=2.0, score_min=1.0,
                       score_max=3.0, normal_scores=STATS, map_low=0.0, map_high=1.0, pixel_threshold=0.5)
    return base.model_copy(update=update)


def test_verdict_bounds_old_manifest_recorded_and_moved() -> None:
    old = cal()  # written before the ng bound existed: the default margin of the span (2.0) above 2.0
    assert old.ng_bound == pytest.approx(2.0 + DEFAULT_REVIEW_MARGIN * 2.0)
    assert [old.verdict(x) for x in (1.999, 2.0, 2.19, 2.2)] == ["ok", "review", "review", "ng"]
    recorded = cal(ng_threshold=2.5)
    assert recorded.ng_bound == 2.5 and recorded.verdict(2.49) == "review" and recorded.verdict(2.5) == "ng"
    # the ng bound is absolute: moving the ok bound alone leaves it, and never crosses it
    assert recorded.with_threshold(2.3).ng_bound == 2.5
    assert recorded.with_threshold(2.7).ng_bound == 2.7 and recorded.with_threshold(2.7).verdict(2.7) == "ng"
    assert old.with_threshold(1.5).ng_bound == pytest.approx(2.2)  # the old default band stays where it was
    assert recorded.with_threshold(2.1, 2.9).ng_bound == 2.9
    assert cal(ng_threshold=1.0).ng_bound == 2.0  # below the ok bound: no review band


def test_ng_bound_at_export_margin_or_labelled() -> None:
    assert ng_bound(2.0, np.array([1.0]), np.array([]), span=2.0) == (2.0 + DEFAULT_REVIEW_MARGIN * 2.0, "margin")
    # labelled: the highest of the ok bound, the lowest kept defect, just above the highest good
    assert ng_bound(2.0, np.array([1.0, 1.5]), np.array([3.0, 4.0])) == (3.0, "labelled")
    assert ng_bound(2.0, np.array([1.0, 3.5]), np.array([3.0, 4.0])) == (just_above(3.5), "labelled")
    assert ng_bound(2.0, np.array([1.0]), np.array([0.5, 0.6])) == (2.0, "labelled")  # defects below: no band
    normals = np.linspace(0.0, 1.0, 20)
    exported = calibrate(normals, np.zeros((20, 4, 4)), "image_score_log")
    assert exported.ng_method == "margin" and exported.ng_threshold == pytest.approx(
        exported.threshold + DEFAULT_REVIEW_MARGIN * (exported.score_max - exported.score_min))
    with_defects = calibrate(normals, np.zeros((20, 4, 4)), "image_score_log", anomalous_scores=np.array([2.0, 3.0]))
    assert with_defects.ng_method == "labelled" and with_defects.ng_threshold == 2.0


def test_refit_separable_labels_put_the_gap_in_review() -> None:
    normals = np.array([0.1, 0.2, 0.3])
    ok_labels = np.array([0.5, 0.6])  # operator-OK parts the old threshold flagged
    ng_labels = np.array([0.9, 1.2])
    ok, ng, method = fit_review_bounds(np.r_[normals, ok_labels], ng_labels, target_recall=0.99)
    # every NG kept (2 labels: 99% allows no miss) at the lowest FPR, with the most headroom:
    # just above the highest good below the lowest NG; the unlabelled gap 0.6..0.9 is review
    assert ok == just_above(0.6) and ng == 0.9 and method == "labelled"
    table = review_table(["ok", "ok", "ng", "ng"], np.r_[ok_labels, ng_labels], ok, ng)
    assert table["confusion"] == {"ok": {"ok": 2, "review": 0, "ng": 0}, "ng": {"ok": 0, "review": 0, "ng": 2}}
    assert table["agreement"] == {"n": 4, "agree": 4} and table["ng"]["recall"] == 1.0


def test_refit_overlap_reviews_defects_below_the_highest_good() -> None:
    goods = np.array([0.1, 0.2, 1.0])  # one good part scores among the defects
    bads = np.array([0.8, 0.9, 1.5])
    ok, ng, _ = fit_review_bounds(goods, bads, target_recall=1.0)
    assert ok == just_above(0.2) and ng == just_above(1.0)
    table = review_table(["ok"] * 3 + ["ng"] * 3, np.r_[goods, bads], ok, ng)
    assert table["confusion"]["ok"] == {"ok": 2, "review": 1, "ng": 0}  # no good part rejected unseen
    assert table["confusion"]["ng"] == {"ok": 0, "review": 2, "ng": 1}
    assert table["ok"] == {"n": 3, "flagged": 1, "fpr": 1 / 3}
    # a lower recall goal may leave a defect out and cut false alarms
    ok2, _, _ = fit_review_bounds(goods, bads, target_recall=0.6)
    assert ok2 == just_above(0.2)  # 0.9 is the cut; the highest good below it is still 0.2


def test_refit_without_defect_labels_uses_the_false_alarm_goal() -> None:
    goods = np.r_[np.linspace(0, 1, 99), 5.0]
    ok, ng, method = fit_review_bounds(goods, np.array([]), target_fpr=0.01, span=2.0)
    assert ok == just_above(1.0) and method == "margin" and ng == pytest.approx(ok + DEFAULT_REVIEW_MARGIN * 2.0)
    with pytest.raises(ValueError):
        fit_review_bounds(np.array([]), np.array([1.0]))


def test_review_table_counts_and_bounds() -> None:
    t = review_table(["ok", "ok", "ng", "ng", "ng"], np.array([0.1, 0.5, 0.5, 0.7, 0.2]), 0.4, 0.6)
    assert t["confusion"] == {"ok": {"ok": 1, "review": 1, "ng": 0}, "ng": {"ok": 1, "review": 1, "ng": 1}}
    assert t["ng"]["detected"] == 2 and t["ok"]["flagged"] == 1 and t["agreement"]["agree"] == 3
    assert t["ng"]["recall_lower_95"] == pytest.approx(recall_lower_bound(2, 3))
    assert recall_lower_bound(3, 3) == pytest.approx(0.05 ** (1 / 3))  # all hit: 0.05^(1/n)
    with pytest.raises(ValueError):
        review_table(["maybe"], np.array([1.0]), 0.0, 1.0)


def test_recalibrate_says_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from msflow.cli import main

    assert main(["recalibrate", "--store", str(tmp_path), "--category", "brick"]) == 2
    assert "no version" in capsys.readouterr().err
