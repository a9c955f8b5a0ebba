"""The evaluation report: every metric of :mod:`models.metrics` over a test set, overall and
per group (defect type, visibility tier), as a JSON-serialisable dict.

Separate from the metrics themselves: each of those is one number with a definition that
raises when it is undefined, while the report is a policy over subsets (each group against
all good images) that records an undefined metric as ``None`` so that one degenerate subset
does not hide the others. The array conventions are :mod:`models.metrics`'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.metrics import (
    DEFAULT_MAX_FPR,
    as_binary_labels,
    as_masks_and_maps,
    as_scores,
    aupro,
    best_f1,
    count_defect_regions,
    image_auroc,
    pixel_auroc,
)

__all__ = ["evaluate_predictions", "metrics_by_group"]


def _json_float(value: float | None) -> float | None:
    """Map non-finite floats to ``None`` so the dict stays strict JSON."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _metric_block(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    max_fpr: float,
    pro_maps: np.ndarray | None = None,
) -> dict[str, Any]:
    """Compute every metric for one subset; undefined metrics become ``None``.

    A missing metric is reported rather than raised so that one degenerate
    subset (e.g. a defect type with no annotated pixels) does not hide all
    the others in the report.
    """
    n_def = int(labels.sum())
    n_good = int(labels.size - n_def)
    block: dict[str, Any] = {
        "image_auroc": None,
        "pixel_auroc": None,
        "aupro": None,
        "best_f1": None,
        "f1_threshold": None,
        "counts": {
            "images": int(labels.size),
            "good": n_good,
            "defective": n_def,
            "defect_pixels": None,
            "defect_regions": None,
        },
    }
    if n_def and n_good:
        block["image_auroc"] = _json_float(image_auroc(labels, scores))
    if n_def:
        f1, thr = best_f1(labels, scores)
        block["best_f1"], block["f1_threshold"] = _json_float(f1), _json_float(thr)
    if masks is not None and maps is not None:
        n_pix = int(np.count_nonzero(masks))
        block["counts"]["defect_pixels"] = n_pix
        if 0 < n_pix < masks.size:
            block["pixel_auroc"] = _json_float(pixel_auroc(masks, maps))
            block["aupro"] = _json_float(aupro(masks, maps if pro_maps is None else pro_maps, max_fpr))
        block["counts"]["defect_regions"] = count_defect_regions(masks)
    return block


def evaluate_predictions(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    defect_types: Sequence[str],
    max_fpr: float = DEFAULT_MAX_FPR,
    pro_maps: np.ndarray | None = None,
) -> dict[str, Any]:
    """Overall and per-defect-type metrics as a JSON-serialisable dict.

    Each defect type is evaluated on *all good test images plus the images of
    that type*, the usual MVTec-style breakdown: it answers "how well are
    scratches separated from good parts" without other types diluting it.
    Metrics that are undefined for a subset (one class only, no defect
    pixel) are ``None``. ``masks``/``maps`` may be ``None`` for image-only
    evaluation.

    Returns:
        ``{"image_auroc", "pixel_auroc", "aupro", "aupro_max_fpr", "best_f1",
        "f1_threshold", "counts", "per_defect_type": {type: {...same keys}}}``.
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    types = np.asarray([str(t) for t in defect_types], dtype=object)
    if types.shape != (y.size,):
        raise ValueError(f"defect_types must have {y.size} entries, got {types.size}")
    m: np.ndarray | None = None
    a: np.ndarray | None = None
    if masks is not None and maps is not None:
        m, a = as_masks_and_maps(masks, maps)
        if m.shape[0] != y.size:
            raise ValueError(f"masks/maps hold {m.shape[0]} images but labels hold {y.size}")
    elif (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps, or neither")

    p = None if pro_maps is None or a is None else np.asarray(pro_maps, dtype=a.dtype).reshape(a.shape)
    result = _metric_block(y, s, m, a, max_fpr, p)
    result["aupro_max_fpr"] = float(max_fpr)
    result["per_defect_type"] = metrics_by_group(y, s, m, a, types, max_fpr, p)
    return result


def metrics_by_group(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None,
    groups: Sequence[str], max_fpr: float = DEFAULT_MAX_FPR, pro_maps: np.ndarray | None = None,
) -> dict[str, Any]:
    """One metric block per group of defective images (a defect type, a visibility tier...).

    Each group is evaluated on *all good images plus that group's defective ones*.
    """
    y = as_binary_labels(labels)
    s = as_scores(scores, y.size)
    names = np.asarray([str(g) for g in groups], dtype=object)
    good = y == 0
    out: dict[str, Any] = {}
    for g in sorted(set(names[y == 1].tolist())):
        sel = good | ((names == g) & (y == 1))
        out[g] = _metric_block(
            y[sel], s[sel], None if masks is None else masks[sel], None if maps is None else maps[sel], max_fpr,
            None if pro_maps is None else pro_maps[sel],
        )
    return out
