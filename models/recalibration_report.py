"""What ``msflow recalibrate`` prints and keeps in ``recalibration.json`` beside the version it
writes (:mod:`models.recalibrate`): the labelled set and the calibration normals before and
after, and the warnings on what the labels can support."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from models.calibrate import fpr_upper_bound
from models.recalibration_guards import MIN_LABELS_PER_CLASS
from models.review_records import ReviewItem, ReviewLabel

REPORT = "recalibration.json"


class Recalibration(BaseModel):
    """What ``recalibration.json`` holds and the command prints."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    category: str
    from_version: str
    to_version: str
    engine_files: Literal["hardlink", "copy"]
    review_store: str
    goal: str
    labelled_ok: int
    labelled_ng: int
    excluded_trained_on: int
    rescored: int
    normals: int
    before: dict[str, Any]
    after: dict[str, Any]
    normals_before: dict[str, Any]
    normals_after: dict[str, Any]
    warnings: list[str]
    max_fpr: float | None = None  # the ceiling it was checked against (None: written before there was one)
    # bound ("ok"/"ng") -> the label classes ("OK"/"NG") of fewer than MIN_LABELS_PER_CLASS
    # labels that moved it; a published version holds any only where accept_small_sample
    small_sample: dict[str, list[str]] = {}
    # labelled items left out: their image file or item.json is gone or unreadable (ids)
    left_out: list[str] = []
    # the source version's threshold override where the server kept one (not carried over)
    source_override: dict[str, Any] | None = None
    # provenance: every label the bounds were fitted on (label_used), so that the version can
    # be explained after a relabel or once the items expired; the manifest holds their digest
    labels_used: list[dict[str, Any]] = []


def label_used(item: ReviewItem, label: ReviewLabel, score: float, rescored: bool) -> dict[str, Any]:
    """One row of ``labels_used``: the item, its label and the score the bounds were fitted on."""
    return {"id": item.id, "image_sha256": item.image.sha256, "label": label.label,
            "defect_type": label.defect_type, "by": label.by, "at": label.at.isoformat(),
            "model_version": item.model_version, "score": score, "rescored": rescored}


def left_out_warnings(left_out: list[str]) -> list[str]:
    if not left_out:
        return []
    shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
    return [f"{len(left_out)} labelled item{'s' if len(left_out) != 1 else ''} left out: its image file or item.json "
            f"is gone, damaged or unreadable (expired or removed meanwhile, cut short): {shown}"]


def override_warning(category: str, from_version: str, to_version: str, override: dict[str, Any], ok: float,
                     ng: float, dry_run: bool) -> str:
    """What an operator's threshold override of the source version becomes: nothing, said."""
    ng_set = override.get("ng_threshold")
    was = f"ok bound {override['threshold']:.6g}" + (f", ng bound {ng_set:.6g}" if ng_set is not None else "")
    return (f"version {from_version} is served with an operator's threshold override ({was}, set "
            f"{override.get('set_at', '?')}); it is not carried over: version {to_version}"
            f"{' would serve' if dry_run else ' serves'} its own bounds, ok {ok:.6g} and ng {ng:.6g}, once loaded. "
            f"If the override should stay, set it on version {to_version} (PUT /v1/models/{category}/threshold)")


def goal_text(target_recall: float) -> str:
    return (f"recall of labelled NG >= {target_recall:.0%} at the lowest false-alarm rate; no known good part at or "
            "above the ng bound")


def normal_block(normals: np.ndarray, threshold: float) -> dict[str, Any]:
    n = int(normals.size)
    flagged = int((normals >= threshold).sum())
    return {"n": n, "flagged": flagged, "fpr": flagged / n if n else None,
            "fpr_upper_95": fpr_upper_bound(flagged, n) if n else None}


def support_warnings(after: dict[str, Any], target_recall: float) -> list[str]:
    """Why the labelled set may be too small to support the change (empty: it is not)."""
    n_ok, n_ng = after["ok"]["n"], after["ng"]["n"]
    lines = []
    if n_ok < MIN_LABELS_PER_CLASS or n_ng < MIN_LABELS_PER_CLASS:
        lines.append(f"the labelled set is too small to support this change: {n_ok} OK and {n_ng} NG labels "
                     f"(at least {MIN_LABELS_PER_CLASS} of each); the bounds follow these few parts closely")
    lower = after["ng"]["recall_lower_95"]
    if n_ng and lower is not None and lower < target_recall:
        needed = math.ceil(math.log(0.05) / math.log(target_recall)) if target_recall < 1 else None
        lines.append(f"{after['ng']['detected']}/{n_ng} labelled NG flagged: the 95% lower bound on recall is "
                     f"{lower:.1%}, below the {target_recall:.0%} goal"
                     + (f" (showing it takes at least {needed} NG labels, all flagged)" if needed else ""))
    return lines


def format_report(r: Recalibration) -> list[str]:
    """The before/after table on the labelled set (and the calibration normals)."""
    b, a = r.before, r.after
    width = 36

    def row(name: str, x: Any, y: Any) -> str:
        return f"{name:<{width}}{x!s:>16}{y!s:>16}"

    def frac(block: dict[str, Any], hit: str) -> str:
        return f"{block[hit]}/{block['n']}"

    lines = [f"recalibrate {r.category}: version {r.from_version} -> {r.to_version} (engine files: {r.engine_files})",
             f"labelled set: {r.labelled_ok} OK, {r.labelled_ng} NG ({r.excluded_trained_on} OK left out: trained "
             f"on; {r.rescored} rescored); calibration normals: {r.normals}",
             f"goal: {r.goal}", "",
             row("", f"before v{r.from_version}", f"after v{r.to_version}"),
             row("ok bound (raw)", f"{b['ok_bound']:.6g}", f"{a['ok_bound']:.6g}"),
             row("ng bound (raw)", f"{b['ng_bound']:.6g}", f"{a['ng_bound']:.6g}")]
    for label in ("ok", "ng"):
        for verdict in ("ok", "review", "ng"):
            lines.append(row(f"{label.upper()} labelled -> {verdict}", b["confusion"][label][verdict],
                             a["confusion"][label][verdict]))
    lines += [row("NG recall (score >= ok bound)", frac(b["ng"], "detected"), frac(a["ng"], "detected")),
              row("false alarms, labelled OK", frac(b["ok"], "flagged"), frac(a["ok"], "flagged")),
              row("false alarms, calibration normals", frac(r.normals_before, "flagged"),
                  frac(r.normals_after, "flagged")),
              row("  95% upper bound on that rate", _percent(r.normals_before.get("fpr_upper_95")),
                  _percent(r.normals_after.get("fpr_upper_95"))),
              row("agreement (model vs operator)", frac(b["agreement"], "agree"), frac(a["agreement"], "agree"))]
    return lines


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"
