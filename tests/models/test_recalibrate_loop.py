"""``msflow recalibrate`` as the review loop runs it again and again: on the session's real
exported version, a real review store and the service's own threshold overrides.

- a labelled item whose image file is gone (a prune killed mid-``rmtree``, an expiry racing
  the read) is left out and said; it stopped the whole recalibration with "image file not
  found" (rc 2) before;
- a refit that leaves both bounds where they are writes no version: run twice on the same
  labels it published an identical version 3, whose swap dropped the operator's threshold
  override of version 2 (served 2.3 -> 2.62) without a word;
- an operator's threshold override of the source version is not carried over (a raw bound of
  one version is not the next one's decision): recalibrate says so and records it;
- ``recalibration.json`` names every label it used (item, image, label, who, when, score), so a
  version's provenance survives a relabel or the items' expiry.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from models.manifest import Manifest, list_versions
from models.recalibrate import Recalibration, recalibrate
from models.review_store import Budget, ReviewStore

CATEGORY = "brick"  # tests/conftest.py's demo category
FIELDS = {"reason": "review", "verdict": "review", "is_anomalous": False, "raw_score": 0.0, "score": 0.5,
          "threshold": 1.0, "ng_threshold": 2.0}


@pytest.fixture
def store(model_store: Path, tmp_path: Path) -> Path:
    """The session's version 1, no labels."""
    out = tmp_path / "store"
    shutil.copytree(model_store, out, ignore=shutil.ignore_patterns(".review"))
    return out


def review(store: Path) -> ReviewStore:
    return ReviewStore(store / ".review", Budget(10**9, 10**6, 10**9, 10**9))


def label(store: Path, paths: list[Path], lab: str, version: str = "0") -> list[str]:
    """Keep ``paths`` as review items scored by ``version`` (another model: they are scored
    again) and label them ``lab``; their ids."""
    ids = []
    for path in paths:
        result, item_id = review(store).add(CATEGORY, {**FIELDS, "model_version": version}, path.read_bytes(), "PNG",
                                            (128, 128), None, None)
        assert result == "stored" and item_id is not None
        review(store).label(CATEGORY, item_id, lab, by="alice", defect_type="stain" if lab == "ng" else None)
        ids.append(item_id)
    return ids


class Labelled(NamedTuple):
    goods: list[Path]
    defects: list[Path]
    ok_ids: list[str]
    ng_ids: list[str]


@pytest.fixture
def labelled(store: Path, demo_test_images: dict[str, list[Path]]) -> Labelled:
    """Every good demo test image labelled ok and every defective one ng, in ``store``."""
    goods = demo_test_images["good"]
    defects = [p for kind, paths in demo_test_images.items() if kind != "good" for p in paths]
    return Labelled(goods, defects, label(store, goods, "ok"), label(store, defects, "ng"))


def run_recalibrate(store: Path, lines: list[str] | None = None, **options: Any) -> tuple[Path | None, Recalibration]:
    """``msflow recalibrate`` as the review loop runs it on the few demo labels (any false
    positive rate, a small sample accepted), what it says (out and warn) appended to ``lines``."""
    say = lines.append if lines is not None else (lambda _: None)
    return recalibrate(store, CATEGORY, out=say, warn=say, max_fpr=1.0, accept_small_sample=True, **options)


def test_a_labelled_item_whose_image_is_gone_is_left_out_and_said(store: Path, labelled: Labelled) -> None:
    gone = labelled.ng_ids[3]
    (store / ".review" / CATEGORY / "items" / gone / "image.png").unlink()
    lines: list[str] = []
    version_dir, report = run_recalibrate(store, lines, dry_run=True)
    assert version_dir is None
    assert report.labelled_ng == len(labelled.defects) - 1 and report.labelled_ok == len(labelled.goods)
    assert any("1 labelled item left out" in line and gone in line for line in lines), lines
    assert any(gone in w for w in report.warnings)
    assert gone not in {row["id"] for row in report.labels_used}
    # the export and the training set read the same listing: the item is missing there too
    assert gone not in {item.id for item, _, _ in review(store).labelled(CATEGORY)}


def test_twice_on_the_same_labels_writes_one_version(store: Path, labelled: Labelled) -> None:
    lines: list[str] = []
    first, report = run_recalibrate(store, lines)
    assert first is not None and first.name == "2"
    assert report.after["ok_bound"] != report.before["ok_bound"] or report.after["ng_bound"] != report.before["ng_bound"]
    lines = []
    again, report = run_recalibrate(store, lines)
    assert again is None and list_versions(store / CATEGORY) == ["1", "2"]
    assert report.from_version == "2"
    assert (report.after["ok_bound"], report.after["ng_bound"]) == (report.before["ok_bound"], report.before["ng_bound"])
    assert any("leave both bounds where version 2 has them: nothing written" in line for line in lines), lines


def test_the_source_versions_threshold_override_is_said_and_recorded(store: Path, labelled: Labelled) -> None:
    from service.config import Settings
    from service.pipeline.thresholds import ThresholdOverrides

    cal = Manifest.read(store / CATEGORY / "1").calibration
    operator_bound = cal.threshold - 0.25 * (cal.threshold - (cal.score_min or 0.0))
    asyncio.run(ThresholdOverrides(Settings(model_store=store), None).set(CATEGORY, "1", operator_bound, force=True))
    lines: list[str] = []
    version_dir, report = run_recalibrate(store, lines)
    assert version_dir is not None
    said = [line for line in lines if "threshold override" in line]
    assert said and f"{operator_bound:.6g}" in said[0] and "not carried" in said[0], lines
    assert f"{report.after['ok_bound']:.6g}" in said[0]
    assert report.source_override is not None and report.source_override["threshold"] == operator_bound
    kept = json.loads((version_dir / "recalibration.json").read_text())
    assert kept["source_override"]["threshold"] == operator_bound
    assert not (version_dir / "threshold_override.json").exists()  # the new version starts at its own bounds


def test_the_report_names_the_labels_it_used_and_a_relabel_changes_them(
        store: Path, labelled: Labelled) -> None:
    ok_ids, ng_ids = labelled.ok_ids, labelled.ng_ids
    version_dir, report = run_recalibrate(store)
    assert version_dir is not None
    kept = json.loads((version_dir / "recalibration.json").read_text())["labels_used"]
    assert {row["id"] for row in kept} == set(ok_ids) | set(ng_ids)
    row = next(r for r in kept if r["id"] == ng_ids[0])
    assert row["label"] == "ng" and row["by"] == "alice" and row["model_version"] == "0" and row["rescored"]
    assert isinstance(row["score"], float) and len(row["image_sha256"]) == 64
    # an operator changes their mind on one part: the next version's report says which label it used
    review(store).label(CATEGORY, ng_ids[0], "ok", by="bob")
    _, report = run_recalibrate(store, dry_run=True)
    row = next(r for r in report.labels_used if r["id"] == ng_ids[0])
    assert row["label"] == "ok" and row["by"] == "bob"
    assert row["rescored"]  # captured by version 0, scored again by version 2
