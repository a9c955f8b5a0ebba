"""Anomaly-detection metrics for MSFlow evaluation (image- and pixel-level).

Everything here works on plain numpy arrays so that the offline trainer, the
evaluation CLI and the service's self-check can share one implementation and
one set of numbers. Where scikit-learn / scikit-image / scipy already do the
job well (ROC AUC, precision-recall, connected components) we call them
instead of re-implementing them; the only hand-written curve is the MVTec AD
per-region-overlap (PRO) curve, because no library ships the exact,
threshold-free version that the published MVTec numbers are computed with.

Conventions
-----------
* ``labels``: image labels, ``0`` = good, ``1`` = defective.
* ``scores``: image anomaly scores, higher = more anomalous.
* ``masks``: ground-truth defect masks, ``bool [N, H, W]`` (non-zero = defect).
* ``maps``: pixel anomaly maps, ``float [N, H, W]``, higher = more anomalous.
* A sample is predicted anomalous when its score is ``>= threshold``.

The report over a whole test set and its groups (every metric at once, undefined ones as
``None``) is :mod:`models.metrics_report`; the input checks below are public because it
checks its inputs by the same conventions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "DEFAULT_MAX_FPR", "as_binary_labels", "as_masks_and_maps", "as_scores", "aupro", "best_f1",
    "count_defect_regions", "image_auroc", "pixel_auroc", "pro_curve",
]

#: Integration limit used by the MVTec AD benchmark for AUPRO.
DEFAULT_MAX_FPR: float = 0.3

# 8-connectivity, identical to the structuring element of the official MVTec
# AD evaluation code; with 4-connectivity diagonal defect pixels would split
# into separate regions and change every PRO value.
_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------
def as_binary_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int array, rejecting anything but 0/1.

    Silently accepting e.g. ``{1, 2}`` would let sklearn pick the positive
    class by sort order, which yields plausible but wrong numbers.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.all(np.isin(arr, (0, 1))):
        raise ValueError(f"{name} must only contain 0 (good) and 1 (defective)")
    return arr.astype(np.int64)


def as_scores(scores: np.ndarray, n: int, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a finite 1-D float array of length ``n``."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_masks_and_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel inputs and return ``(bool [N,H,W], float [N,H,W])``.

    A single ``[H, W]`` image is promoted to ``[1, H, W]`` for convenience.
    Float32 maps are kept as float32 (no copy): casting to float64 would
    double peak memory on large test sets without changing any tie structure.
    """
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or m.shape != a.shape:
        raise ValueError(
            f"masks and maps must both be [N, H, W] with equal shapes, got {m.shape} and {a.shape}"
        )
    if m.dtype != bool:
        m = m != 0
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("maps contain NaN or infinite values")
    return m, a


def _check_both_classes(labels: np.ndarray, what: str) -> None:
    """Raise a readable error when a ranking metric is undefined."""
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        present = "defective" if n_pos else "good"
        raise ValueError(
            f"{what} is undefined: only one class present ({labels.size} {present} samples); "
            "it needs at least one good and one defective sample"
        )


# --------------------------------------------------------------------------
# image level
# --------------------------------------------------------------------------
def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (probability a defective image outranks a good one).

    Ties count one half, so a constant scorer gets exactly 0.5.

    Raises:
        ValueError: if only one class is present or inputs are malformed.
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    _check_both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best achievable F1 over all thresholds and the threshold achieving it.

    Used to pick an operating point from a validation set; the returned
    threshold means "flag an image when ``score >= threshold``". When several
    thresholds tie for the best F1 the highest one (fewest alarms) is returned.

    Raises:
        ValueError: if there is no defective sample (F1 is then undefined).
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    if y.sum() == 0:
        raise ValueError("best F1 is undefined without at least one defective sample")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.divide(2.0 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)
    # thresholds are ascending, so the last maximum is the highest threshold.
    idx = int(len(f1) - 1 - np.argmax(f1[::-1]))
    return float(f1[idx]), float(thresholds[idx])


# --------------------------------------------------------------------------
# pixel level
# --------------------------------------------------------------------------
def pixel_auroc(masks: np.ndarray, maps: np.ndarray, chunk_size: int = 1 << 20) -> float:
    """Pixel-level AUROC over all pixels of all images pooled together (exact).

    Why not ``sklearn.metrics.roc_auc_score`` on the flattened arrays: it
    materialises about eight P-length float64/int64 buffers (measured
    +418 MB and 2.7 s for 100 x 256 x 256 pixels), so memory grows 64 B per
    pixel and high-resolution maps would not fit. AUROC equals the
    Mann-Whitney statistic ``P(s_defect > s_normal) + 0.5 P(tie)``, which we
    count exactly: sort the *smaller* class once, then stream the larger
    class in ``chunk_size`` pieces through ``np.searchsorted``. Peak extra
    memory is the smaller class plus one chunk; the result matches sklearn
    to float rounding (cross-checked in ``tests/test_metrics.py``).

    Raises:
        ValueError: if there is no defect pixel or no normal pixel.
    """
    m, a = as_masks_and_maps(masks, maps)
    y = m.reshape(-1)
    s = a.reshape(-1)
    _check_both_classes(y, "pixel AUROC")
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.size - n_pos)
    small_is_pos = n_pos <= n_neg
    small = np.sort(s[y] if small_is_pos else s[~y])
    wins = 0  # pairs where the defect pixel scores strictly higher
    ties = 0  # pairs with equal scores (count one half)
    for start in range(0, y.size, chunk_size):
        yc, sc = y[start : start + chunk_size], s[start : start + chunk_size]
        big = sc[~yc] if small_is_pos else sc[yc]
        if big.size == 0:
            continue
        lo = np.searchsorted(small, big, side="left")
        hi = np.searchsorted(small, big, side="right")
        ties += int(np.sum(hi - lo, dtype=np.int64))
        if small_is_pos:  # big = normal pixels: count defect pixels above each
            wins += int(np.sum(small.size - hi, dtype=np.int64))
        else:  # big = defect pixels: count normal pixels below each
            wins += int(np.sum(lo, dtype=np.int64))
    # Python ints: exact even when n_pos * n_neg exceeds float precision.
    return (2 * wins + ties) / (2 * n_pos * n_neg)


def _pro_weights(masks: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Per-pixel PRO increments ``1/|r|`` (0 on normal pixels).

    Returns the weights (not yet divided by the number of regions, to keep
    them exact), the total number of regions and of normal pixels. Regions
    are labelled per image: a defect never spans two images.
    """
    weights = np.zeros(masks.shape, dtype=np.float64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=_EIGHT_CONNECTIVITY)
        if n == 0:
            continue
        sizes = np.bincount(labelled.ravel(), minlength=n + 1).astype(np.float64)
        inv = np.zeros_like(sizes)
        inv[1:] = 1.0 / sizes[1:]
        weights[i] = inv[labelled]
        num_regions += n
    num_normal = int(masks.size - np.count_nonzero(masks))
    return weights, num_regions, num_normal


def count_defect_regions(masks: np.ndarray) -> int:
    """Defect regions of ``masks`` (``bool [N, H, W]``), labelled per image as the PRO curve labels them."""
    return int(sum(ndimage.label(mk, structure=_EIGHT_CONNECTIVITY)[1] for mk in masks))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact, threshold-free PRO curve as in the official MVTec AD evaluation.

    Every distinct anomaly-map value is a threshold. Pixels are sorted by
    score, descending; each normal pixel adds ``1/num_normal`` to the FPR and
    each pixel of defect region ``r`` adds ``1/(|r| * num_regions)`` to the
    PRO (the mean per-region overlap). Cumulative sums then give the curve,
    and only the last point of each run of equal scores is kept so that tied
    pixels act as a single threshold (order within a tie cannot matter).
    Like the reference code the curve is framed by ``(0, 0)`` and ``(1, 1)``.

    Returns:
        ``(fpr, pro)``: non-decreasing float64 arrays of equal length.

    Raises:
        ValueError: if there is no defect region or no normal pixel.
    """
    m, a = as_masks_and_maps(masks, maps)
    weights, num_regions, num_normal = _pro_weights(m)
    if num_regions == 0:
        raise ValueError("PRO curve is undefined: the masks contain no defect region")
    if num_normal == 0:
        raise ValueError("PRO curve is undefined: the masks contain no normal pixel")

    flat_scores = a.reshape(-1)
    order = np.argsort(flat_scores)[::-1]  # descending; tie order is irrelevant
    sorted_scores = flat_scores[order]
    # Keep the last index of every run of equal scores.
    keep = np.empty(sorted_scores.size, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=keep[:-1])
    keep[-1] = True
    del sorted_scores

    # Integer cumulative count of false positives: exact, then one division.
    fp = np.cumsum(~m.reshape(-1)[order], dtype=np.int64)[keep]
    fpr = fp / float(num_normal)
    del fp
    pro_sorted = weights.reshape(-1)[order]
    del weights, order
    np.cumsum(pro_sorted, out=pro_sorted)
    pro = pro_sorted[keep] / float(num_regions)
    del pro_sorted

    # Float round-off in the cumulative sum may overshoot 1 by ~1e-16.
    np.clip(fpr, 0.0, 1.0, out=fpr)
    np.clip(pro, 0.0, 1.0, out=pro)
    zero, one = np.zeros(1), np.ones(1)
    return np.concatenate((zero, fpr, one)), np.concatenate((zero, pro, one))


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve ``(x, y)`` for ``x <= x_max``.

    ``x`` must be non-decreasing. When ``x_max`` falls strictly between two
    samples, ``y`` is linearly interpolated there (same rule as MVTec's
    ``trapezoid``) so the result does not depend on threshold granularity.
    """
    area = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if not 0 < ins < x.size:
            raise ValueError(f"x_max={x_max} lies outside the curve's range")
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    area += float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    return float(area)


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Area under the PRO curve up to ``max_fpr``, normalised to ``[0, 1]``.

    This is the MVTec AD "AU-PRO@30%" segmentation metric: unlike pixel
    AUROC it weights every defect region equally, so a small scratch counts
    as much as a large stain. A perfect map scores 1.0; a random map scores
    about ``max_fpr / 2``.

    Raises:
        ValueError: if ``max_fpr`` is not in ``(0, 1]`` or the curve is undefined.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(masks, maps)
    return _trapezoid_up_to(fpr, pro, max_fpr) / max_fpr
