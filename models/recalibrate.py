"""``msflow recalibrate``: refit both verdict bounds from operator labels, as a new model version.

Inputs: the category's newest (or a given) version, its calibration normals (scored again
with the version's own ONNX graph, so they are the engine's scores) and the labelled review
items (:mod:`models.review_store`): operator-OK parts join the known goods, operator-NG parts
are the known defects. A labelled item scored by this very version keeps the score it was
served with; one scored by another version is scored again (raw scores of another model are
on another scale). OK parts the version was trained on (``reviewed_ok.json``, written by
``msflow train --include-reviewed-ok``) are left out of the known goods: their scores are
optimistic.

Goal (:func:`models.calibrate.fit_review_bounds`): recall of labelled NG at least
``target_recall`` at the lowest false-alarm rate; the ng bound just above every known good
and below the kept defects, so the overlap is reviewed.

Output: a complete version folder written like ``msflow export`` (a dot folder renamed into
place), whose engine files are **hard links** to the source version's (instant, no second
copy of a large engine or TensorRT plan; safe because engine files are never written in
place), falling back to a copy where the file system cannot link (another device, no link
support). Only the manifest's calibration changes; ``recalibration.json`` beside it holds
the before/after tables printed here. The serving registry loads it like any new version.

A ceiling on false alarms: labels can pull the ok bound far down (a few NG labels on parts
that score like normals), and the new version would then flag most good parts. Before
anything is written, the false-alarm rate on the calibration normals at the new ok bound is
compared with ``max_fpr`` (``--max-fpr``, default :data:`DEFAULT_MAX_FPR`): a version whose
one-sided 95% upper bound on that rate is above the ceiling, and above the source version's
own bound (a small calibration set's bound is high even with no false alarm: that is no
change), is refused with the figures and the flag that accepts it. ``dry_run`` prints the
table (and what would be refused) and writes nothing.

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

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from models.calibrate import fit_review_bounds, fpr_upper_bound
from models.data import Sample, folder_of_good_images, load_images
from models.manifest import (CATEGORY_PATTERN, DEFAULT_NG_RECALL, DEFAULT_REVIEW_MARGIN, DEFAULT_TARGET_FPR,
                             LabelSource, Manifest, file_entry, list_versions, sha256_file)
from models.publish import next_version, publish_version
from models.review_store import REVIEWED_OK, ReviewStore, resolve_root
from models.verdicts import review_table

REPORT = "recalibration.json"
MIN_LABELS_PER_CLASS = 10  # below this many OK or NG labels the change is called unsupported
ENGINE_FILES = ("model.onnx", "model.plan")
# Ceiling on the one-sided 95% upper bound of the new false-alarm rate on the calibration
# normals (msflow recalibrate --max-fpr; msflow/cli.py states it in its help, since the parser
# must not import this module: it imports scikit-learn and scipy).
DEFAULT_MAX_FPR = 0.1


class RecalibrationError(ValueError):
    """Nothing to recalibrate from (no version, no labels, no normals), a setting out of range,
    or a result refused (false alarms above the ceiling)."""


class FalseAlarmCeilingError(RecalibrationError):
    """The new ok bound would flag more calibration normals than ``max_fpr`` allows."""


class SmallSampleError(RecalibrationError):
    """A bound would move on fewer than :data:`MIN_LABELS_PER_CLASS` labels of a class."""


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


class _Scorer:
    """The version's ONNX graph on CPU (onnxruntime only: no torch), built on first use."""

    def __init__(self, version_dir: Path, manifest: Manifest) -> None:
        self.path = version_dir / manifest.onnx.file
        self.manifest = manifest
        self._session: Any = None

    def __call__(self, samples: list[Sample], batch: int = 16) -> np.ndarray:
        if not samples:
            return np.zeros(0)
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        images = load_images(samples, self.manifest.input_size)  # the server's pixel path
        name, output = self.manifest.inputs[0].name, self.manifest.calibration.score_output
        parts = [self._session.run([output], {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)]
        return np.concatenate(parts).astype(np.float64)


def _normal_samples(manifest: Manifest, calibration_images: Path | None) -> tuple[list[Sample], list[str]]:
    notes: list[str] = []
    if calibration_images is not None:
        return folder_of_good_images(calibration_images), notes
    source = manifest.calibration.source
    if source is not None and source.path and Path(source.path).is_dir():
        samples = folder_of_good_images(source.path)
        digest = hashlib.sha256("".join(sorted(sha256_file(s.path) for s in samples)).encode()).hexdigest()
        if digest != source.digest:
            notes.append(f"the calibration images in {source.path} changed since export ({len(samples)} now, "
                         f"{source.count} then)")
        return samples, notes
    if source is not None and source.kind == "training_holdout" and manifest.source_run:
        holdout = Path(manifest.source_run) / "holdout.json"
        if holdout.is_absolute() and holdout.is_file():  # a relative run path names no folder from here
            return [Sample(path=Path(p), label=0, defect_type="good") for p in json.loads(holdout.read_text())], notes
    raise RecalibrationError("the calibration normals of this version are not reachable here: pass "
                             "--calibration-images DIR (normal images the model never trained on)")


def _place(src: Path, dst: Path) -> Literal["hardlink", "copy"]:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:  # another device, or a file system without hard links
        shutil.copy2(src, dst)
        return "copy"


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


def recalibrate(store: str | Path, category: str, review_store: str | Path | None = None,
                version: str | None = None, target_recall: float = DEFAULT_NG_RECALL,
                calibration_images: str | Path | None = None, out: Callable[[str], None] = print,
                warn: Callable[[str], None] | None = None, max_fpr: float | None = None,
                dry_run: bool = False, accept_small_sample: bool = False) -> tuple[Path | None, Recalibration]:
    """Write a recalibrated version of ``category`` into ``store``; returns its folder (None for
    ``dry_run``, which prints the table and writes nothing) and report. Raises, after printing
    the table, :class:`FalseAlarmCeilingError` when the new bounds break ``max_fpr`` (default
    :data:`DEFAULT_MAX_FPR`), else :class:`SmallSampleError` when a bound moves on fewer than
    :data:`MIN_LABELS_PER_CLASS` labels of a class and not ``accept_small_sample``."""
    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
    max_fpr = DEFAULT_MAX_FPR if max_fpr is None else max_fpr
    check_settings(category, target_recall, max_fpr)
    store = Path(store).expanduser().resolve()  # recorded absolute, as export records its paths
    category_dir = store / category
    versions = list_versions(category_dir)
    if not versions:
        raise RecalibrationError(f"{category}: no version in {category_dir}")
    source_version = version or versions[-1]
    if source_version not in versions:
        raise RecalibrationError(f"{category}: no version {source_version!r} (have {', '.join(versions)})")
    src = category_dir / source_version
    manifest = Manifest.read(src)
    manifest.verify_files(src)  # a damaged engine must not be passed on
    cal = manifest.calibration
    root = (resolve_root(Path(review_store).expanduser()) if review_store else store / ".review").resolve()
    labelled = ReviewStore(root).labelled(category)
    if not labelled:
        raise RecalibrationError(f"{category}: no labelled review items in {root} (label some first)")

    trained_on: set[str] = set()
    if (src / REVIEWED_OK).is_file():
        trained_on = {row["sha256"] for row in json.loads((src / REVIEWED_OK).read_text())}
    by_image: dict[str, tuple[Any, Any, Path]] = {}
    for item, label, path in labelled:  # one judgement per image: the latest
        previous = by_image.get(item.image.sha256)
        if previous is None or label.at >= previous[1].at:
            by_image[item.image.sha256] = (item, label, path)
    rows = [r for sha, r in sorted(by_image.items()) if not (r[1].label == "ok" and sha in trained_on)]
    excluded = len(by_image) - len(rows)
    if not rows:
        raise RecalibrationError(f"{category}: every labelled item is an OK image the model was trained on")

    scorer = _Scorer(src, manifest)
    stale = [i for i, (item, _, _) in enumerate(rows) if item.model_version != source_version]
    scores = np.array([item.raw_score for item, _, _ in rows], dtype=np.float64)
    if stale:
        scores[stale] = scorer([Sample(path=rows[i][2], label=0, defect_type="good") for i in stale])
    labels = [label.label for _, label, _ in rows]
    normal_samples, notes = _normal_samples(manifest, Path(calibration_images) if calibration_images else None)
    normals = scorer(normal_samples)

    ok_scores = scores[[lab == "ok" for lab in labels]]
    ng_scores = scores[[lab == "ng" for lab in labels]]
    def fit(ok_labelled: np.ndarray, ng_labelled: np.ndarray) -> tuple[float, float, Any]:
        return fit_review_bounds(np.r_[normals, ok_labelled], ng_labelled, target_recall,
                                 cal.target_fpr or DEFAULT_TARGET_FPR, cal.review_margin or DEFAULT_REVIEW_MARGIN,
                                 cal.span)

    ok, ng, ng_method = fit(ok_scores, ng_scores)
    small = small_sample_moves(lambda o, n: fit(o, n)[:2], ok_scores, ng_scores, (cal.threshold, cal.ng_bound))
    before = review_table(labels, scores, cal.threshold, cal.ng_bound)
    after = review_table(labels, scores, ok, ng)
    normals_before = _normal_block(normals, cal.threshold)
    normals_after = _normal_block(normals, ok)
    warnings = notes + _support_warnings(after, target_recall)
    ceiling = ceiling_refusal(category, source_version, normals_before, normals_after, max_fpr)
    too_few = None if accept_small_sample else small_sample_refusal(category, before, after, small, len(ok_scores),
                                                                      len(ng_scores))
    refusals = [r for r in (ceiling, too_few) if r]
    if dry_run or refusals:
        report = Recalibration(
            category=category, from_version=source_version,
            to_version=next_version(category_dir), engine_files="hardlink",  # what publishing would give now
            review_store=str(root), goal=_goal(target_recall), labelled_ok=len(ok_scores), labelled_ng=len(ng_scores),
            excluded_trained_on=excluded, rescored=len(stale), normals=len(normals), before=before, after=after,
            normals_before=normals_before, normals_after=normals_after, warnings=warnings, max_fpr=max_fpr,
            small_sample=small)
        for line in format_report(report):
            out(line)
        for line in warnings:
            warn(line)
        if refusals and not dry_run:
            raise (FalseAlarmCeilingError if ceiling else SmallSampleError)("; and ".join(refusals))
        for refusal in refusals:
            warn(f"would be refused: {refusal}")
        out("dry run: nothing written")
        return None, report

    digest = hashlib.sha256("".join(sorted(f"{item.image.sha256}:{label.label}\n" for item, label, _ in rows))
                            .encode()).hexdigest()
    new_cal = cal.model_copy(update={
        "method": "review_labels", "threshold": ok, "ng_threshold": ng, "ng_method": ng_method,
        "review_margin": cal.review_margin if ng_method == "margin" else None, "target_recall": target_recall,
        "recall_calibration": after["ng"]["recall"], "fpr_calibration": normals_after["fpr"],
        "fpr_upper_95": normals_after["fpr_upper_95"], "anomalous_images": len(ng_scores),
        "labels": LabelSource(review_store=str(root), ok=len(ok_scores), ng=len(ng_scores), digest=digest,
                              target_recall=target_recall, excluded_trained_on=excluded)})
    staging = Path(tempfile.mkdtemp(prefix=".recalibrate-", dir=category_dir))
    try:
        # Every listed file but an earlier recalibration's report, which is written anew below
        # (writing into a hard link would change the source version's file too).
        carried = {name: entry for name, entry in manifest.files.items() if name != REPORT}
        placed = {name: _place(src / name, staging / name) for name in carried}
        engine_files = "copy" if any(placed.get(n) == "copy" for n in ENGINE_FILES) else "hardlink"
        report = Recalibration(
            category=category, from_version=source_version, to_version="", engine_files=engine_files,
            review_store=str(root), goal=_goal(target_recall), labelled_ok=len(ok_scores),
            labelled_ng=len(ng_scores), excluded_trained_on=excluded, rescored=len(stale), normals=len(normals),
            before=before, after=after, normals_before=normals_before, normals_after=normals_after,
            warnings=warnings, max_fpr=max_fpr, small_sample=small)

        def number_it(new_version: str) -> None:  # under the category's lock (models/publish.py)
            nonlocal report
            report = report.model_copy(update={"to_version": new_version})
            (staging / REPORT).write_text(report.model_dump_json(indent=2))
            files = {**carried, REPORT: file_entry(staging / REPORT)}
            new = manifest.model_copy(update={"version": new_version, "created_at": datetime.now(timezone.utc),
                                              "calibration": new_cal, "files": files,
                                              "recalibrated_from": source_version})
            new.write(staging)
            new.verify_files(staging)

        final = publish_version(category_dir, staging, None, number_it)  # the registry may load it from now on
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for line in format_report(report):
        out(line)
    for line in warnings:
        warn(line)
    return final, report


BOUNDS = ("ok", "ng")


def _same(a: float, b: float) -> bool:
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
        if _same(new[i], old[i]):
            continue
        by = [cls for cls in few if not _same(alone[cls][i], new[i])]
        if not by and both is not None and not _same(both[i], new[i]):
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


def _goal(target_recall: float) -> str:
    return (f"recall of labelled NG >= {target_recall:.0%} at the lowest false-alarm rate; no known good part at or "
            "above the ng bound")


def _normal_block(normals: np.ndarray, threshold: float) -> dict[str, Any]:
    n = int(normals.size)
    flagged = int((normals >= threshold).sum())
    return {"n": n, "flagged": flagged, "fpr": flagged / n if n else None,
            "fpr_upper_95": fpr_upper_bound(flagged, n) if n else None}


def _support_warnings(after: dict[str, Any], target_recall: float) -> list[str]:
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
