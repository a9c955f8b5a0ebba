"""``msflow recalibrate``: refit both verdict bounds from operator labels, as a new model version.

Inputs: the category's newest (or a given) version, its calibration normals (scored again
with the version's own ONNX graph, so they are the engine's scores) and the labelled review
items (:mod:`models.review_store`): operator-OK parts join the known goods, operator-NG parts
are the known defects. A labelled item scored by this very version keeps the score it was
served with; one scored by another version is scored again (raw scores of another model are
on another scale), and so is one captured before the version was written (a number used
again). OK parts the version was trained on (``reviewed_ok.json``, written by
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
the before/after tables printed here and names every label used (``labels_used``). The
serving registry loads it like any new version. Nothing is written where the labels leave
both bounds as they are: such a version changes no verdict, and its swap would drop the
source version's threshold override. That override is never carried over (a raw bound an
operator chose for one version); it is said, with the bounds that replace it. A labelled
item whose image is gone is left out, and said. The calibration normals count each image
once, at least 10 of them, none an image the run trained on (as export refuses them); an OK
label of a normal counts once, as the normal.

What it refuses (settings out of range, false alarms above a ceiling, a bound moved by too
few labels) is :mod:`models.recalibration_guards`; the table it prints and keeps is
:mod:`models.recalibration_report`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.calibrate import MIN_CALIBRATION_NORMALS, distinct_images, fit_review_bounds, trained_on_digests
from models.data import Sample, folder_of_good_images
from models.data_loading import load_images
from models.manifest import (DEFAULT_NG_RECALL, DEFAULT_REVIEW_MARGIN, DEFAULT_TARGET_FPR, LabelSource, Manifest,
                             file_entry, list_versions, sha256_file)
from models.publish import new_staging, next_version, publish_version
from models.recalibration_guards import (DEFAULT_MAX_FPR, MIN_LABELS_PER_CLASS, FalseAlarmCeilingError,
                                         RecalibrationError, SmallSampleError, ceiling_refusal, check_settings,
                                         same_bound, small_sample_moves, small_sample_refusal)
from models.recalibration_report import (REPORT, Recalibration, format_report, goal_text, label_used,
                                         left_out_warnings, normal_block, override_warning, support_warnings)
from models.review_store import REVIEWED_OK, ReviewStore, resolve_root
from models.verdicts import review_table

__all__ = ["DEFAULT_MAX_FPR", "MIN_LABELS_PER_CLASS", "REPORT", "FalseAlarmCeilingError", "Recalibration",
           "RecalibrationError", "SmallSampleError", "check_settings", "format_report", "recalibrate",
           "small_sample_moves"]

ENGINE_FILES = ("model.onnx", "model.plan")
OVERRIDE_FILE = "threshold_override.json"  # service.pipeline.threshold_files.OVERRIDE_FILE


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


def _distinct_normals(samples: list[Sample], trained: set[str],
                      notes: list[str]) -> tuple[list[Sample], set[str]]:
    """The normals each image once, and their sha256s; refused (:class:`RecalibrationError`) where
    any is an image the model trained on or fewer than :data:`MIN_CALIBRATION_NORMALS` are left,
    as ``msflow export`` refuses them. A copy counted one part twice in the false-alarm bound
    written into the manifest (12 normals and 3 copies of each: a 6.1% bound where 12 parts
    support 22%), an image the flows fit scores optimistically, and 3 normals were fitted on."""
    kept, copies, first = distinct_images(samples)
    if copies:
        notes.append(f"{len(copies)} calibration image(s) with the same bytes as another left out, {len(kept)} "
                     f"distinct kept: {', '.join(copies[:3])}{', ...' if len(copies) > 3 else ''}")
    if fit_on := [str(path) for digest, path in first.items() if digest in trained]:
        raise RecalibrationError(f"{len(fit_on)} of the {len(kept)} calibration normals are images the model trained "
                                 f"on ({', '.join(fit_on[:3])}{', ...' if len(fit_on) > 3 else ''}): pass "
                                 "--calibration-images DIR of normal images it never saw")
    if len(kept) < MIN_CALIBRATION_NORMALS:
        raise RecalibrationError(f"recalibration needs at least {MIN_CALIBRATION_NORMALS} distinct calibration normals "
                                 f"the model never trained on, got {len(kept)}: pass --calibration-images DIR")
    return kept, set(first)


def _trained_on(src: Path, manifest: Manifest) -> set[str]:
    """sha256 of the images the version's flows fit: its run's training images where that run is
    reachable here (less its holdout), and the reviewed OK images it took in."""
    trained: set[str] = set()
    if (src / REVIEWED_OK).is_file():
        trained = {row["sha256"] for row in json.loads((src / REVIEWED_OK).read_text())}
    run = Path(manifest.source_run) if manifest.source_run else None
    if run is not None and run.is_absolute() and (run / "config.json").is_file():
        trained |= trained_on_digests(run)
    return trained


def read_source_override(overrides_root: Path, category: str, version: str) -> dict[str, Any] | None:
    """The server's threshold override of ``version`` (``<root>/<category>/<version>/
    threshold_override.json``, as :mod:`service.pipeline.threshold_files` writes it), or None.
    Read here, not through the service's module: models never import the service. One the
    server would not use (damaged, another version's) is none."""
    try:
        data = json.loads((overrides_root / category / version / OVERRIDE_FILE).read_text())
    except (OSError, ValueError):
        return None
    threshold = data.get("threshold") if isinstance(data, dict) else None
    if (not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
            or str(data.get("version")) != version):
        return None
    return {key: data.get(key) for key in ("threshold", "ng_threshold", "set_at")}


def _place(src: Path, dst: Path) -> Literal["hardlink", "copy"]:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:  # another device, or a file system without hard links
        shutil.copy2(src, dst)
        return "copy"


def recalibrate(store: str | Path, category: str, review_store: str | Path | None = None,
                version: str | None = None, target_recall: float = DEFAULT_NG_RECALL,
                calibration_images: str | Path | None = None, out: Callable[[str], None] = print,
                warn: Callable[[str], None] | None = None, max_fpr: float | None = None,
                dry_run: bool = False, accept_small_sample: bool = False,
                threshold_overrides: str | Path | None = None) -> tuple[Path | None, Recalibration]:
    """Write a recalibrated version of ``category`` into ``store``; returns its folder (None for
    ``dry_run``, which prints the table and writes nothing, and where the labels leave both
    bounds as they are) and report. ``threshold_overrides``: where the server keeps its
    threshold overrides (``MSFLOW_THRESHOLD_OVERRIDES_DIR``; default the store), to say that
    the source version's is not carried over. Raises, after printing
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
    reviews = ReviewStore(root)
    labelled = reviews.labelled(category)
    left_out = sorted({label.id for label in reviews.labels(category)} - {item.id for item, _, _ in labelled})
    if not labelled:
        raise RecalibrationError(f"{category}: no labelled review items in {root} (label some first)"
                                 + (f"; {len(left_out)} labelled item(s) lost their image or item.json" if left_out else ""))

    trained_on = _trained_on(src, manifest)
    normal_samples, notes = _normal_samples(manifest, Path(calibration_images) if calibration_images else None)
    normal_samples, normal_digests = _distinct_normals(normal_samples, trained_on, notes)
    by_image: dict[str, tuple[Any, Any, Path]] = {}
    for item, label, path in labelled:  # one judgement per image: the latest
        previous = by_image.get(item.image.sha256)
        if previous is None or label.at >= previous[1].at:
            by_image[item.image.sha256] = (item, label, path)
    # An OK label of a calibration normal is that normal again: counted twice as a known good before.
    ok_normals = sum(r[1].label == "ok" and sha in normal_digests for sha, r in by_image.items())
    if ok_normals:
        notes.append(f"{ok_normals} OK label(s) are calibration normals (the same bytes): each counted once, "
                     "as a normal")
    rows = [r for sha, r in sorted(by_image.items())
            if not (r[1].label == "ok" and (sha in trained_on or sha in normal_digests))]
    excluded = sum(r[1].label == "ok" and sha in trained_on for sha, r in by_image.items())
    if not rows:
        raise RecalibrationError(f"{category}: every labelled item is an OK image the model was trained on "
                                 "or a calibration normal")

    scorer = _Scorer(src, manifest)
    # An item names its version by number only, and numbers are used again (a category deleted
    # and exported again starts at 1): one captured before this version was written was scored
    # by another model, whatever its number says (another scale; kept as served before).
    stale = [i for i, (item, _, _) in enumerate(rows)
             if item.model_version != source_version or item.captured_at < manifest.created_at]
    scores = np.array([item.raw_score for item, _, _ in rows], dtype=np.float64)
    if stale:
        scores[stale] = scorer([Sample(path=rows[i][2], label=0, defect_type="good") for i in stale])
    labels = [label.label for _, label, _ in rows]
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
    normals_before = normal_block(normals, cal.threshold)
    normals_after = normal_block(normals, ok)
    override = read_source_override(Path(threshold_overrides).expanduser() if threshold_overrides else store,
                                    category, source_version)
    unchanged = same_bound(ok, cal.threshold) and same_bound(ng, cal.ng_bound)
    next_number = next_version(category_dir)
    warnings = notes + left_out_warnings(left_out) + support_warnings(after, target_recall)
    if override is not None and not unchanged:
        warnings.append(override_warning(category, source_version, next_number, override, ok, ng, dry_run))
    ceiling = ceiling_refusal(category, source_version, normals_before, normals_after, max_fpr)
    too_few = None if accept_small_sample else small_sample_refusal(category, before, after, small, len(ok_scores),
                                                                      len(ng_scores))
    refusals = [r for r in (ceiling, too_few) if r]
    stale_rows = set(stale)
    report = Recalibration(
        category=category, from_version=source_version,
        to_version=next_number, engine_files="hardlink",  # what publishing would give now
        review_store=str(root), goal=goal_text(target_recall), labelled_ok=len(ok_scores), labelled_ng=len(ng_scores),
        excluded_trained_on=excluded, rescored=len(stale), normals=len(normals), before=before, after=after,
        normals_before=normals_before, normals_after=normals_after, warnings=warnings, max_fpr=max_fpr,
        small_sample=small, left_out=left_out, source_override=override,
        labels_used=[label_used(item, label, float(scores[i]), i in stale_rows)
                     for i, (item, label, _) in enumerate(rows)])
    if dry_run or refusals or unchanged:
        for line in format_report(report):
            out(line)
        for line in warnings:
            warn(line)
        if refusals and not dry_run:
            raise (FalseAlarmCeilingError if ceiling else SmallSampleError)("; and ".join(refusals))
        for refusal in refusals:
            warn(f"would be refused: {refusal}")
        if unchanged:
            # A new version with the bounds of the old one changes no verdict, yet its swap drops
            # the old version's threshold override: run twice on the same labels, the operator's
            # bound was gone from the line without a word.
            out(f"{category}: the labels leave both bounds where version {source_version} has them: nothing written"
                + ("" if dry_run else f" (version {source_version} stays)"))
        if dry_run:
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
    held = new_staging(category_dir, ".recalibrate-")  # held: a later publish removes it if this one dies
    staging = held.path
    try:
        # Every listed file but an earlier recalibration's report, which is written anew below
        # (writing into a hard link would change the source version's file too).
        carried = {name: entry for name, entry in manifest.files.items() if name != REPORT}
        placed = {name: _place(src / name, staging / name) for name in carried}
        engine_files = "copy" if any(placed.get(n) == "copy" for n in ENGINE_FILES) else "hardlink"
        report = report.model_copy(update={"to_version": "", "engine_files": engine_files})

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
    finally:
        held.close()
    for line in format_report(report):
        out(line)
    for line in warnings:
        warn(line)
    return final, report
