"""Tests for models.metrics and models.report_plots.

The AUPRO cases are worked out by hand in the comments so that a wrong
tie rule, a wrong normalisation or a wrong interpolation at ``max_fpr``
changes the asserted value, not just "some number in [0, 1]".
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label as sk_label
from sklearn.metrics import roc_auc_score

from models.metrics import (
    aupro,
    best_f1,
    image_auroc,
    pixel_auroc,
    pro_curve,
)
from models.metrics_report import evaluate_predictions
from models.report_plots import plot_example_grid, plot_roc_curves, select_examples

# --------------------------------------------------------------------------
# image / pixel AUROC
# --------------------------------------------------------------------------


def test_image_auroc_perfect_reversed_and_ties() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert image_auroc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert image_auroc(labels, np.full(4, 0.5)) == 0.5
    # 3 of 4 (good, defective) pairs correctly ordered.
    assert image_auroc(labels, np.array([0.1, 0.5, 0.3, 0.9])) == pytest.approx(0.75)


def test_image_auroc_one_class_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="only one class"):
        image_auroc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="0 \\(good\\) and 1"):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))


def test_pixel_auroc_perfect_reversed_ties() -> None:
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    assert pixel_auroc(masks, masks.astype(np.float32)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks.astype(np.float32)) == 0.0
    assert pixel_auroc(masks, np.zeros((2, 4, 4))) == 0.5
    with pytest.raises(ValueError, match="only one class"):
        pixel_auroc(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))


@pytest.mark.parametrize("defect_fraction", [0.05, 0.5, 0.9])
def test_pixel_auroc_matches_sklearn_with_ties_and_chunks(defect_fraction: float) -> None:
    # Both branches (defects or normals being the smaller class) and chunk
    # boundaries falling anywhere must give sklearn's exact value.
    rng = np.random.default_rng(7)
    masks = rng.random((3, 21, 17)) < defect_fraction
    maps = (rng.integers(0, 6, masks.shape) + masks * rng.integers(0, 3, masks.shape)).astype(
        np.float32
    )
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    for chunk in (1, 97, 1 << 20):
        assert pixel_auroc(masks, maps, chunk_size=chunk) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------
# PRO curve / AUPRO
# --------------------------------------------------------------------------
# One 4x4 image, two 8-connected regions of different sizes:
#   A = {(0,0)}                 |A| = 1
#   B = {(2,2), (2,3), (3,3)}   |B| = 3
# 12 normal pixels, so each adds 1/12 to FPR; a pixel of A adds
# 1/(1*2) = 1/2 to PRO and a pixel of B adds 1/(3*2) = 1/6.
_MASK = np.array(
    [
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 0, 1],
    ],
    dtype=bool,
)


def _hand_map(tie: bool) -> np.ndarray:
    """Scores, descending: B .95, n .90, A .85, n .80, n .75, B .70, n .65, ...

    Remaining 8 normals get .60 .. .25; the last B pixel gets .10, or .65
    (tied with the normal pixel at .65) when ``tie`` is set.
    """
    m = np.zeros((4, 4))
    m[2, 2], m[0, 1], m[0, 0], m[0, 2], m[0, 3], m[2, 3], m[1, 0] = (
        0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65,
    )
    rest = [(1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    for k, (r, c) in enumerate(rest):
        m[r, c] = 0.60 - 0.05 * k
    m[3, 3] = 0.65 if tie else 0.10
    return m


def test_pro_curve_hand_case_points() -> None:
    fpr, pro = pro_curve(_MASK[None], _hand_map(tie=False)[None])
    exp_fpr = [0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12]
    exp_pro = [0, 1, 1, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6]
    np.testing.assert_allclose(fpr, np.array(exp_fpr) / 12, atol=1e-12)
    np.testing.assert_allclose(pro, np.array(exp_pro) / 6, atol=1e-12)


def test_aupro_hand_case_between_thresholds() -> None:
    # Curve up to FPR 0.3 (PRO is a step function here):
    #   FPR 0    -> 1/12 at PRO 1/6 : 1/12 * 1/6 = 1/72
    #   FPR 1/12 -> 3/12 at PRO 2/3 : 2/12 * 2/3 = 1/9
    #   FPR 3/12 -> 0.3  at PRO 5/6 : 0.05 * 5/6 = 1/24
    #     (0.3 lies between the points 3/12 and 4/12, both with PRO 5/6)
    # area = 1/72 + 8/72 + 3/72 = 1/6 ; AUPRO = (1/6) / 0.3 = 5/9
    assert aupro(_MASK, _hand_map(tie=False)) == pytest.approx(5 / 9, abs=1e-9)


def test_aupro_max_fpr_hitting_a_curve_point_exactly() -> None:
    # max_fpr = 1/4 is a curve point: area = 1/72 + 1/9 = 1/8 ; / 0.25 = 0.5
    assert aupro(_MASK, _hand_map(tie=False), max_fpr=0.25) == pytest.approx(0.5, abs=1e-9)


def test_aupro_tie_is_one_threshold_and_interpolated_at_max_fpr() -> None:
    # The last B pixel ties with the normal pixel at .65, so the curve jumps
    # diagonally from (3/12, 5/6) to (4/12, 1) in ONE step. 0.3 lies inside
    # that step: PRO(0.3) = 5/6 + (1/6) * (0.05 / (1/12)) = 5/6 + 1/10 = 14/15
    #   last trapezoid = 0.05 * (5/6 + 14/15) / 2 = 53/1200
    #   area = 1/72 + 1/9 + 53/1200 = (50 + 400 + 159) / 3600 = 609/3600
    #   AUPRO = 609/3600 / 0.3 = 203/360
    # Breaking the tie defect-first would give 7/12, normal-first 5/9.
    fpr, pro = pro_curve(_MASK[None], _hand_map(tie=True)[None])
    assert np.count_nonzero(np.isclose(fpr, 4 / 12)) == 1  # tie -> one point
    i = int(np.flatnonzero(np.isclose(fpr, 4 / 12))[0])
    assert pro[i] == pytest.approx(1.0) and pro[i - 1] == pytest.approx(5 / 6)
    assert aupro(_MASK, _hand_map(tie=True)) == pytest.approx(203 / 360, abs=1e-9)


def test_aupro_perfect_map_is_one() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 32, 32), bool)
    masks[0, 2:5, 2:9] = True
    masks[0, 20:30, 20:22] = True
    masks[2, 10:12, 10:12] = True
    maps = masks + 0.5 * rng.random(masks.shape) * ~masks
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_random_map_is_near_expectation() -> None:
    # With i.i.d. scores every pixel is above a threshold with the same
    # probability, so PRO(FPR) ~ FPR and AUPRO@0.3 ~ (0.3**2 / 2) / 0.3 = 0.15.
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 96, 96), bool)
    for i in range(4):
        for r in range(5):
            y, x = rng.integers(5, 80, 2)
            masks[i, y : y + 3 + 2 * r, x : x + 4 + r] = True
    maps = rng.random(masks.shape)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.015)


def _brute_force_pro(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve straight from the definition, one threshold at a time.

    Regions come from scikit-image (8-connectivity, as in the MVTec code),
    independently of the scipy labelling used by the implementation.
    """
    regions = []  # (image index, region mask)
    for i, mk in enumerate(masks):
        lab = sk_label(mk, connectivity=2)
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    fprs, pros = [], []
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(pred[~masks].mean())
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
    return np.array(fprs), np.array(pros)


def test_pro_curve_matches_definition_on_random_quantised_maps() -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((2, 9, 11)) < 0.25  # irregular, diagonal-touching blobs
    masks[0, 0, 0] = True
    maps = rng.integers(0, 12, masks.shape).astype(float)  # many ties
    fpr, pro = pro_curve(masks, maps)
    exp_fpr, exp_pro = _brute_force_pro(masks, maps)
    np.testing.assert_allclose(fpr[1:-1], exp_fpr, atol=1e-12)
    np.testing.assert_allclose(pro[1:-1], exp_pro, atol=1e-12)


def test_pro_undefined_without_regions() -> None:
    with pytest.raises(ValueError, match="no defect region"):
        aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(_MASK, _hand_map(False), max_fpr=0.0)


# --------------------------------------------------------------------------
# best F1 and the full report
# --------------------------------------------------------------------------


def test_best_f1_hand_case() -> None:
    # Sorted desc: .9(1) .8(1) .7(0) .4(0) .35(1) .1(0); 3 positives.
    # thr .9: P=1 R=1/3 F=.5 | thr .8: P=1 R=2/3 F=.8 | thr .7: P=R=2/3 F=.667
    # thr .4: P=1/2 R=2/3 F=.571 | thr .35: P=3/5 R=1 F=.75 | thr .1: F=.667
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    f1, thr = best_f1(labels, scores)
    assert f1 == pytest.approx(0.8, abs=1e-12)
    assert thr == pytest.approx(0.8)
    with pytest.raises(ValueError, match="defective"):
        best_f1(np.zeros(3, int), np.arange(3.0))


def _toy_set() -> tuple[np.ndarray, ...]:
    """2 good, 2 scratch (well separated), 1 hole (scored below the goods)."""
    labels = np.array([0, 0, 1, 1, 1])
    types = ["good", "good", "scratch", "scratch", "hole"]
    scores = np.array([0.2, 0.3, 0.8, 0.9, 0.1])
    masks = np.zeros((5, 8, 8), bool)
    masks[2, 1:3, 1:3] = True
    masks[3, 5:7, 4:8] = True  # the hole image has no annotated pixel
    maps = masks * 1.0 + 0.1
    return labels, scores, masks, maps, types


def test_evaluate_predictions_overall_and_per_type() -> None:
    labels, scores, masks, maps, types = _toy_set()
    out = evaluate_predictions(labels, scores, masks, maps, types)
    json.dumps(out, allow_nan=False)  # strict JSON, no numpy scalars
    # 6 (good, defective) pairs, the hole loses both -> 4/6
    assert out["image_auroc"] == pytest.approx(4 / 6)
    assert out["pixel_auroc"] == 1.0 and out["aupro"] == pytest.approx(1.0)
    assert out["counts"] == {
        "images": 5, "good": 2, "defective": 3, "defect_pixels": 12, "defect_regions": 2,
    }
    assert set(out["per_defect_type"]) == {"hole", "scratch"}
    scratch, hole = out["per_defect_type"]["scratch"], out["per_defect_type"]["hole"]
    assert scratch["image_auroc"] == 1.0 and scratch["best_f1"] == 1.0
    assert scratch["counts"]["images"] == 4 and scratch["aupro"] == pytest.approx(1.0)
    assert hole["image_auroc"] == 0.0
    # hole subset has no defect pixel -> pixel metrics skipped, not crashed
    assert hole["pixel_auroc"] is None and hole["aupro"] is None
    assert hole["counts"]["defect_pixels"] == 0


def test_evaluate_predictions_image_only_and_single_class() -> None:
    labels, scores, _, _, types = _toy_set()
    out = evaluate_predictions(labels, scores, None, None, types)
    assert out["pixel_auroc"] is None and out["image_auroc"] == pytest.approx(4 / 6)
    only_good = evaluate_predictions(labels[:2], scores[:2], None, None, types[:2])
    assert only_good["image_auroc"] is None and only_good["best_f1"] is None
    assert only_good["per_defect_type"] == {}


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot_roc_curves_writes_wide_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    labels, scores, masks, maps, _ = _toy_set()
    w, h = _png_size(plot_roc_curves(labels, scores, masks, maps, tmp_path / "roc.png", "toy"))
    assert w > 1.5 * h  # two panels side by side
    # subsampled pixel curve and undefined image panel must not crash
    out = tmp_path / "sub" / "r2.png"
    _png_size(plot_roc_curves(np.ones(5), scores, masks, maps, out, max_pixels=50))


def test_select_examples_mixes_types_and_worst() -> None:
    labels = np.array([0] * 6 + [1] * 6)
    types = ["good"] * 6 + ["scratch"] * 3 + ["hole"] * 3
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.95] + [0.9, 0.8, 0.05] + [0.7, 0.75, 0.85])
    picked = select_examples(labels, scores, types, max_rows=6)
    assert picked == select_examples(labels, scores, types, max_rows=6)  # deterministic
    idx = [i for i, _ in picked]
    assert len(idx) == len(set(idx)) == 6
    assert idx[:2] == [8, 5]  # lowest-scored defective, highest-scored good
    assert {types[i] for i in idx} == {"good", "scratch", "hole"}


def test_plot_example_grid_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    labels, scores, masks, maps, types = _toy_set()
    images = rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    w1, h1 = _png_size(
        plot_example_grid(images, masks, maps, scores, labels, types, tmp_path / "g1.png", max_rows=1)
    )
    w5, h5 = _png_size(
        plot_example_grid(images, masks, maps, scores, labels, types, tmp_path / "g5.png",
                          vmin=0.0, vmax=1.0)
    )
    assert w1 > h1  # one row of four panels
    assert w5 == w1 and h5 > 3 * h1  # rows stack vertically, columns fixed
