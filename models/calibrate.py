"""Threshold calibration on normal images the flows never trained on.

Policies, recorded in the manifest:

- ``target_fpr`` (default, 1%): the lowest threshold at which at most ``target_fpr`` of the
  calibration normals are flagged. With ``n`` normals the empirical rate moves in steps of
  ``1/n``, so the manifest also records the one-sided 95% Clopper-Pearson upper bound on
  the true false-alarm rate (the uncertainty a small calibration set leaves).
- ``target_recall``: with labelled anomalies, the highest threshold that still flags
  ``target_recall`` of them; the false-alarm rate on normals it costs is recorded.
- ``f1_optimal``: with labelled anomalies, the threshold that maximises F1.

Map statistics of the normal images fix the heatmap colour range (a good part looks cool)
and the pixel threshold used for defect regions.

The second bound of the three-way verdict (ok / review / ng), :func:`ng_bound`: without
labelled anomalies, a margin above the threshold (``DEFAULT_REVIEW_MARGIN`` of the score
span); with them, the lowest bound at or above the threshold that still keeps
``target_recall`` of them and has no known good part at or above it, so the score range where
goods and defects overlap (or where no labelled part lies) goes to a person. The same rule
refits both bounds from operator labels (:func:`fit_review_bounds`, ``msflow recalibrate``).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sized
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import beta

from models.data import DataError, MVTecCategory, Sample, folder_of_good_images
from models.manifest import (DEFAULT_NG_RECALL, DEFAULT_REVIEW_MARGIN, DEFAULT_TARGET_FPR, Calibration,
                             CalibrationSource, ScoreStats, sha256_file)
from models.metrics import best_f1
from models.review_store import REVIEWED_OK
from models.runs import read_json

Policy = Literal["target_fpr", "target_recall", "f1_optimal"]
# Fewer normals than this bound the false-alarm rate above a quarter even when none is
# flagged (one-sided 95% Clopper-Pearson: 10 normals, 0 flagged -> 25.9%): no threshold.
MIN_CALIBRATION_NORMALS = 10


def score_stats(scores: np.ndarray) -> ScoreStats:
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("calibration needs at least one normal image")
    p50, p95, p99 = np.percentile(s, [50, 95, 99])
    return ScoreStats(count=int(s.size), mean=float(s.mean()), std=float(s.std()), min=float(s.min()),
                      p50=float(p50), p95=float(p95), p99=float(p99), max=float(s.max()))


def fpr_upper_bound(flagged: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as ``flagged`` out of ``n``."""
    if n <= 0:
        return 1.0
    if flagged >= n:
        return 1.0
    return float(beta.ppf(confidence, flagged + 1, n - flagged))


def threshold_for_fpr(normal: np.ndarray, target_fpr: float) -> float:
    """Lowest threshold (``score >= t`` flags) with at most ``floor(target_fpr * n)`` normals flagged."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    ranked = np.sort(np.asarray(normal, dtype=np.float64))[::-1]
    allowed = int(math.floor(target_fpr * ranked.size + 1e-9))
    # Just above the (allowed+1)-th highest normal score: that one and all below pass.
    return float(np.nextafter(ranked[allowed], np.inf))


def threshold_for_recall(anomalous: np.ndarray, target_recall: float) -> float:
    """Highest threshold that still flags at least ``target_recall`` of the labelled anomalies."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    ranked = np.sort(np.asarray(anomalous, dtype=np.float64))
    misses = int(math.floor((1.0 - target_recall) * ranked.size + 1e-9))
    return float(ranked[min(misses, ranked.size - 1)])


def just_above(x: float) -> float:
    """The smallest float above ``x``: a bound with ``x`` just outside it (``score >= bound`` flags)."""
    return float(np.nextafter(float(x), np.inf))


def ng_bound(threshold: float, good: np.ndarray, bad: np.ndarray, target_recall: float = DEFAULT_NG_RECALL,
             margin: float = DEFAULT_REVIEW_MARGIN, span: float = 1.0) -> tuple[float, Literal["margin", "labelled"]]:
    """The ng bound for an ok bound ``threshold`` and how it was set.

    No labelled anomalies (``bad`` empty): ``threshold + margin * span``. With them: the highest
    of the ok bound, the bound that keeps ``target_recall`` of them (their lowest kept score),
    and just above the highest known good (``good``), so no known good part is ever rejected
    without a person and the overlap of goods and defects is reviewed.
    """
    g = np.asarray(good, dtype=np.float64)
    b = np.asarray(bad, dtype=np.float64)
    if not b.size:
        return float(threshold + margin * span), "margin"
    candidates = [float(threshold), threshold_for_recall(b, target_recall)]
    if g.size:
        candidates.append(just_above(g.max()))
    return max(candidates), "labelled"


def fit_review_bounds(good: np.ndarray, bad: np.ndarray, target_recall: float = DEFAULT_NG_RECALL,
                      target_fpr: float = DEFAULT_TARGET_FPR, margin: float = DEFAULT_REVIEW_MARGIN,
                      span: float = 1.0) -> tuple[float, float, Literal["margin", "labelled"]]:
    """(ok bound, ng bound, ng method) from known goods (calibration normals and operator-OK
    parts) and known defects (operator-NG parts), to the goal: recall of the known defects at
    least ``target_recall`` at the lowest false-alarm rate on the known goods.

    The highest ok bound that keeps the recall has the lowest false-alarm rate; every bound
    down to just above the highest good below it has the same rate, and the lowest of those is
    taken, because it leaves the most room for defects not yet seen. Without labelled defects
    the ok bound is ``target_fpr`` on the known goods. The ng bound follows :func:`ng_bound`.
    """
    g = np.asarray(good, dtype=np.float64)
    b = np.asarray(bad, dtype=np.float64)
    if not g.size:
        raise ValueError("recalibration needs known good scores (the calibration normals)")
    if not b.size:
        ok = threshold_for_fpr(g, target_fpr)
    else:
        highest = threshold_for_recall(b, target_recall)
        below = g[g < highest]
        ok = just_above(below.max()) if below.size else highest
    ng, method = ng_bound(ok, g, b, target_recall, margin, span)
    return ok, ng, method


def calibrate(normal_scores: np.ndarray, normal_maps: np.ndarray, score_output: str,
              anomalous_scores: np.ndarray | None = None, policy: Policy = "target_fpr",
              target_fpr: float = DEFAULT_TARGET_FPR, target_recall: float | None = None,
              source: CalibrationSource | None = None) -> Calibration:
    """Calibration from normal scores/maps the model never trained on (and optional anomalies).
    Raises ValueError for fewer than :data:`MIN_CALIBRATION_NORMALS` normals, or for scores or
    maps that are not finite (a NaN sorts anywhere and is written as null: the threshold, or
    the manifest, would be unusable)."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    if normal.size < MIN_CALIBRATION_NORMALS:
        raise ValueError(f"calibration needs at least {MIN_CALIBRATION_NORMALS} normal images the model never "
                         f"trained on, got {normal.size}: with so few, even none flagged leaves the false-alarm "
                         f"rate's 95% bound at {fpr_upper_bound(0, normal.size):.0%}")
    anomalous = np.asarray(anomalous_scores if anomalous_scores is not None else [], dtype=np.float64)
    for name, values in (("normal scores", normal), ("normal maps", np.asarray(normal_maps)),
                         ("anomalous scores", anomalous)):
        if (bad := int(values.size - np.isfinite(values).sum())) > 0:
            raise ValueError(f"calibration: {bad} of the {values.size} {name} are not finite (NaN or infinity): "
                             "the model's outputs are broken (diverged training?); no threshold can come of them")
    stats = score_stats(normal)
    if policy != "target_fpr" and not anomalous.size:
        raise ValueError(f"the {policy} policy needs labelled anomalous images (export --validation DIR)")
    if policy == "target_fpr":
        threshold = threshold_for_fpr(normal, target_fpr)
    elif policy == "target_recall":
        if target_recall is None:
            raise ValueError("the target_recall policy needs target_recall")
        threshold = threshold_for_recall(anomalous, target_recall)
    else:
        labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
        _, threshold = best_f1(labels, np.r_[normal, anomalous])
    flagged = int((normal >= threshold).sum())
    recall = float((anomalous >= threshold).mean()) if anomalous.size else None
    top = float(np.percentile(anomalous, 95)) if anomalous.size else threshold + (threshold - stats.p50)
    # The normalisation span runs from the typical normal score to a clearly anomalous one,
    # so scores spread over [0, 1] instead of all sticking to 0.5 +- epsilon.
    score_min = stats.p50
    score_max = max(top, threshold + 1e-6, score_min + 1e-6)

    maps = np.asarray(normal_maps, dtype=np.float64)
    map_low, map_p999 = np.percentile(maps, [50, 99.9])
    map_high = float(map_low + 2.0 * max(map_p999 - map_low, 1e-6))
    ng, ng_method = ng_bound(float(threshold), normal, anomalous, target_recall or DEFAULT_NG_RECALL,
                             DEFAULT_REVIEW_MARGIN, score_max - score_min)
    return Calibration(
        score_output=score_output, method=policy, threshold=float(threshold),
        score_min=float(score_min), score_max=float(score_max), normal_scores=stats,
        anomalous_images=int(anomalous.size), map_low=float(map_low), map_high=map_high,
        pixel_threshold=float(map_p999), target_fpr=target_fpr if policy == "target_fpr" else None,
        target_recall=target_recall if policy == "target_recall" else None,
        fpr_calibration=flagged / normal.size, fpr_upper_95=fpr_upper_bound(flagged, normal.size),
        recall_calibration=recall, source=source, ng_threshold=ng, ng_method=ng_method,
        review_margin=DEFAULT_REVIEW_MARGIN if ng_method == "margin" else None,
    )


def calibration_samples(run: Path, calibration_images: Path | None = None) -> tuple[list[Sample], CalibrationSource]:
    """Normal images to calibrate a run on, best first, and where they came from.

    An explicit ``calibration_images`` folder wins (the user said so); then the data set's
    ``calibration/good``; then the run's training holdout, with a warning: held-out crops
    of the same photographs (or the same day's parts) may share what training saw, which
    makes the threshold optimistic.
    """
    if calibration_images is not None:
        samples = folder_of_good_images(calibration_images)
        _enough(samples, f"{calibration_images.resolve()} holds", "add normal images to it")
        return _never_trained_on(run, *_with_source(samples, "calibration_images", calibration_images.resolve(), True))
    cfg = read_json(run / "config.json")
    if cfg.get("data") and cfg.get("category"):
        category = MVTecCategory(cfg["data"], cfg["category"])
        if category.has_calibration:
            samples = category.calibration_samples()
            _enough(samples, f"{category.calibration_dir} holds", "add normal images to it (export also "
                    "takes --calibration-images DIR)")
            return _never_trained_on(run, *_with_source(samples, "calibration_set", category.calibration_dir, True))
    paths = read_json(run / "holdout.json") if (run / "holdout.json").is_file() else []
    if not paths:
        raise ValueError(f"{run} has no normal images to calibrate on: give the data set a calibration/good "
                         "folder, pass --calibration-images DIR, or train with --holdout-fraction > 0")
    _enough(paths, f"{run}'s training holdout holds", "give the data set a calibration/good folder, pass "
            "--calibration-images DIR, or train with a larger --holdout-fraction")
    warnings.warn(f"calibrating {run} on its training holdout ({len(paths)} images): these may share content "
                  "with the training images, so the threshold may be optimistic (too many false alarms on new "
                  "parts). Prefer a calibration/good folder or --calibration-images DIR.", stacklevel=2)
    return _with_source([Sample(path=Path(p), label=0, defect_type="good") for p in paths], "training_holdout",
                        None, False)


def _enough(samples: Sized, where: str, remedy: str) -> None:
    """Refuse too few normals here, before the model is loaded and exported: :func:`calibrate`
    found them only after that work, and without saying where they came from."""
    if len(samples) < MIN_CALIBRATION_NORMALS:
        raise ValueError(f"calibration needs at least {MIN_CALIBRATION_NORMALS} normal images the model never "
                         f"trained on; {where} {len(samples)}: {remedy}")


def distinct_images(samples: list[Sample]) -> tuple[list[Sample], list[str], dict[str, Path]]:
    """The samples each image once (the first of each set of the same bytes), the copies left
    out (``"<path> (= <first>)"``), and the sha256 of every distinct image -> its first path."""
    first: dict[str, Path] = {}
    kept, copies = [], []
    for s in samples:
        if (seen := first.setdefault(sha256_file(s.path), s.path)) != s.path:
            copies.append(f"{s.path} (= {seen})")
        else:
            kept.append(s)
    return kept, copies, first


def _with_source(samples: list[Sample], kind: str, path: Path | None,
                 never_trained_on: bool) -> tuple[list[Sample], CalibrationSource]:
    """The samples, each image once, and their source record. A copy (the same bytes under
    another name) would count one part twice in the false-alarm bound and the manifest's count,
    claiming normals never seen: copies are left out, with a warning naming them, and what is
    left must still be enough. Left out, not refused: the demo's own generator drew a few crops
    twice (4 of brick's 60 calibration normals), and a refusal stopped its build."""
    kept, copies, first = distinct_images(samples)
    if copies:
        named = f"{', '.join(copies[:3])}{', ...' if len(copies) > 3 else ''}"
        _enough(kept, f"{len(samples)} images, copies left out, hold",
                f"{len(copies)} are copies of others ({named}): add distinct normal images")
        warnings.warn(f"calibration: {len(copies)} image(s) with the same bytes as another left out, "
                      f"{len(kept)} distinct kept: {', '.join(copies[:5])}{', ...' if len(copies) > 5 else ''}",
                      stacklevel=3)
    digest = hashlib.sha256("".join(sorted(first)).encode()).hexdigest()
    source = CalibrationSource(kind=kind, path=str(path) if path else None, count=len(kept), digest=digest,
                               never_trained_on=never_trained_on)
    return kept, source


def _never_trained_on(run: Path, samples: list[Sample],
                      source: CalibrationSource) -> tuple[list[Sample], CalibrationSource]:
    """Refuse calibration images the run trained on (the same bytes): the flows fit them, so a
    threshold set on them is too low a bar for new parts, and the manifest would call them
    never trained on. Compared with the data set's train/good (less the run's holdout) and the
    reviewed OK images the run took in."""
    trained = trained_on_digests(run)
    if trained and (seen := sum(sha256_file(s.path) in trained for s in samples)):
        raise ValueError(f"{seen} of the {len(samples)} calibration images ({source.path}) are images {run} trained "
                         "on: calibrate on normals the model never saw")
    return samples, source


def trained_on_digests(run: Path) -> set[str]:
    """sha256 of the images ``run`` trained on, as far as the run records them."""
    cfg = read_json(run / "config.json")
    digests: set[str] = set()
    if cfg.get("data") and cfg.get("category"):
        try:
            category = MVTecCategory(cfg["data"], cfg["category"])
        except DataError as exc:  # exported on another machine than it trained on
            warnings.warn(f"cannot check the calibration images against {run}'s training images: {exc}",
                          stacklevel=3)
        else:
            holdout = {Path(p).resolve() for p in (read_json(run / "holdout.json")
                                                    if (run / "holdout.json").is_file() else [])}
            digests |= {sha256_file(s.path) for s in category.train_samples() if s.path.resolve() not in holdout}
    if (run / REVIEWED_OK).is_file():
        digests |= {row["sha256"] for row in read_json(run / REVIEWED_OK)}
    return digests
