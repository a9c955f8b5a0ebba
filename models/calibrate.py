"""Threshold calibration on images the flows never trained on.

Two methods, recorded in the manifest:

- ``f1_optimal``: when labelled anomalous validation images exist, the raw-score threshold
  that maximises F1 on normals + anomalies.
- ``normal_quantile``: otherwise, a high quantile of the held-out normal scores plus a
  margin proportional to their spread (``q + margin * (q - median)``), so roughly
  ``1 - quantile`` of normal parts or fewer are flagged.

Map statistics of the normal images fix the heatmap colour range (a good part looks cool)
and the pixel threshold used for defect regions.
"""

from __future__ import annotations

import numpy as np

from models.manifest import Calibration, ScoreStats
from models.metrics import best_f1


def score_stats(scores: np.ndarray) -> ScoreStats:
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    p50, p95, p99 = np.percentile(s, [50, 95, 99])
    return ScoreStats(count=int(s.size), mean=float(s.mean()), std=float(s.std()), min=float(s.min()),
                      p50=float(p50), p95=float(p95), p99=float(p99), max=float(s.max()))


def calibrate(normal_scores: np.ndarray, normal_maps: np.ndarray, score_output: str,
              anomalous_scores: np.ndarray | None = None, quantile: float = 0.99,
              margin: float = 0.25) -> Calibration:
    """Calibration from held-out normal scores/maps (and optional anomalous scores)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    stats = score_stats(normal)
    anomalous = np.asarray(anomalous_scores if anomalous_scores is not None else [], dtype=np.float64)
    if anomalous.size:
        labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
        _, threshold = best_f1(labels, np.r_[normal, anomalous])
        method, q, m = "f1_optimal", None, None
        top = float(np.percentile(anomalous, 95))
    else:
        q_value = float(np.quantile(normal, quantile))
        threshold = q_value + margin * max(q_value - stats.p50, 0.0)
        method, q, m = "normal_quantile", quantile, margin
        top = threshold + (threshold - stats.p50)
    # The normalisation span runs from the typical normal score to a clearly anomalous one,
    # so scores spread over [0, 1] instead of all sticking to 0.5 +- epsilon.
    score_min = stats.p50
    score_max = max(top, threshold + 1e-6, score_min + 1e-6)

    maps = np.asarray(normal_maps, dtype=np.float64)
    map_low, map_p999 = np.percentile(maps, [50, 99.9])
    map_high = float(map_low + 2.0 * max(map_p999 - map_low, 1e-6))
    return Calibration(
        score_output=score_output, method=method, threshold=float(threshold),
        score_min=float(score_min), score_max=float(score_max), normal_scores=stats,
        anomalous_images=int(anomalous.size), map_low=float(map_low), map_high=map_high,
        pixel_threshold=float(map_p999), quantile=q, margin=m,
    )
