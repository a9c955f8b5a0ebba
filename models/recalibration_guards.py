"""What ``msflow recalibrate`` refuses (:mod:`models.recalibrate`): settings out of range, and
new bounds that the labels cannot support.

A ceiling on false alarms: labels can pull the ok bound far down (a few NG labels on parts
that score like normals), and the new version would then flag most good parts. Before
anything is written, the false-alarm rate on the calibration normals at the new ok bound is
compared with ``max_fpr`` (``--max-fpr``, default :data:`DEFAULT_MAX_FPR`): a version whose
one-sided 95% upper bound on that rate is above the ceiling, and above the source version's
own bound (a small calibration set's bound is high even with no false alarm: that is no
change), is refused with the figures and the flag that accepts it (:func:`ceiling_refusal`).

A floor under each bound: with a few labels the refit follows those few parts (one NG label
put the ng bound at that part's score, and 73 of 105 defects went from ng to review). A bound
may move on labels of a class (OK or NG) only where there are at least
:data:`MIN_LABELS_PER_CLASS` of that class: refitted without the labels of a smaller class,
a bound that lands elsewhere was moved by them (:func:`small_sample_moves`). The NG labels
set both bounds where there are any (the recall goal: the ok bound under them, the ng bound
at their lowest kept score), OK labels a bound where an OK part is the highest known good
under it; OK labels alone (no NG) move the ok bound's false-alarm quantile. Such a version is
refused, after the table, unless ``accept_small_sample`` (``--accept-small-sample``); the
report names the bounds and classes (``small_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from models.manifest import CATEGORY_PATTERN

MIN_LABELS_PER_CLASS = 10  # below this many OK or NG labels the change is called unsupported
# Ceiling on the one-sided 95% upper bound of the new false-alarm rate on the calibration
# normals (msflow recalibrate --max-fpr; msflow/cli.py states it in its help, since the parser
# must not import this module: it imports scikit-learn and scipy).
DEFAULT_MAX_FPR = 0.1
BOUNDS = ("ok", "ng")


class RecalibrationError(ValueError):
    """Nothing to recalibrate from (no version, no labels, no normals), a setting out of range,
    or a result refused (false alarms above the ceiling)."""


class FalseAlarmCeilingError(RecalibrationError):
    """The new ok bound would flag more calibration normals than ``max_fpr`` allows."""


class SmallSampleError(RecalibrationError):
    """A bound would move on fewer than :data:`MIN_LABELS_PER_CLASS` labels of a class."""


def check_settings(category: str, target_recall: float, max_fpr: float) -> None:
    """RecalibrationError for a setting out of range, before anything is read."""
    if not isinstance(category, str) or not CATEGORY_PATTERN.fullmatch(category):
        raise RecalibrationError(f"category {category!r} must match {CATEGORY_PATTERN.pattern}")
    if not (isinstance(target_recall, (int, float)) and 0.0 < target_recall <= 1.0):  # NaN fails too
        raise RecalibrationError(f"--target-recall must be in (0, 1], got {target_recall}")
    if not (isinstance(max_fpr, (int, float)) and 0.0 <= max_fpr <= 1.0):
        raise RecalibrationError(f"--max-fpr must be in [0, 1], got {max_fpr}")


def ceiling_refusal(category: str, from_version: str, before: dict[str, Any], after: dict[str, Any],
                    max_fpr: float) -> str | None:
    """Why the new bounds are refused (one line), or None. Refused: a 95% upper bound on the
    false-alarm rate of the calibration normals above ``max_fpr`` and above the source
    version's (an unchanged bound from a small set is not a new risk)."""
    up, was = after.get("fpr_upper_95"), before.get("fpr_upper_95")
    if up is None or up <= max(max_fpr, was or 0.0):
        return None
    accept = math.ceil(up * 1000) / 1000
    return (f"{category}: the new ok bound would flag {after['flagged']}/{after['n']} calibration normals (false-alarm "
            f"rate {after['fpr']:.1%}, 95% upper bound {up:.1%}; version {from_version}: {before['flagged']}/"
            f"{before['n']}, bound {was:.1%}), above the --max-fpr ceiling of {max_fpr:.1%}: nothing written. Check "
            f"the labels (good parts labelled NG?) or pass --max-fpr {accept:g} to accept it")


def same_bound(a: float, b: float) -> bool:
    """Two bounds equal but for float noise."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def small_sample_moves(fit: Callable[[np.ndarray, np.ndarray], tuple[float, float]], ok_scores: np.ndarray,
                       ng_scores: np.ndarray, old: tuple[float, float]) -> dict[str, list[str]]:
    """Which bounds the labels of a class with fewer than :data:`MIN_LABELS_PER_CLASS` labels
    move: ``{"ok"|"ng": ["OK"|"NG", ...]}``, empty when none. ``fit(ok_scores, ng_scores)``
    gives (ok bound, ng bound); ``old`` are the source version's. A bound counts as moved by a
    class when it differs from ``old`` and refitted without that class's labels it lands
    elsewhere (both classes together only where neither alone explains it)."""
    new = fit(ok_scores, ng_scores)
    few = [cls for cls, scores in (("OK", ok_scores), ("NG", ng_scores)) if 0 < scores.size < MIN_LABELS_PER_CLASS]
    none = np.zeros(0)

    def without(classes: list[str]) -> tuple[float, float]:
        return fit(none if "OK" in classes else ok_scores, none if "NG" in classes else ng_scores)

    moved: dict[str, list[str]] = {}
    alone = {cls: without([cls]) for cls in few}
    both = without(few) if len(few) > 1 else None
    for i, bound in enumerate(BOUNDS):
        if same_bound(new[i], old[i]):
            continue
        by = [cls for cls in few if not same_bound(alone[cls][i], new[i])]
        if not by and both is not None and not same_bound(both[i], new[i]):
            by = list(few)
        if by:
            moved[bound] = by
    return moved


def small_sample_refusal(category: str, before: dict[str, Any], after: dict[str, Any],
                         small: dict[str, list[str]], n_ok: int, n_ng: int) -> str | None:
    """Why the new bounds are refused for want of labels (one line), or None."""
    if not small:
        return None
    count = {"OK": n_ok, "NG": n_ng}
    moves = ", ".join(
        f"the {bound} bound {before[f'{bound}_bound']:.6g} -> {after[f'{bound}_bound']:.6g} on "
        + " and ".join(f"{count[cls]} {cls} label{'s' if count[cls] != 1 else ''}" for cls in classes)
        for bound, classes in small.items())
    return (f"{category}: too few labels to move a bound: {moves} (a bound moves on at least {MIN_LABELS_PER_CLASS} "
            f"labels of each class that moves it): nothing written. Label more parts, or pass --accept-small-sample "
            f"to publish it anyway")
