"""The review store on a real temporary folder: items, labels, budget, retention, export."""

from __future__ import annotations

import io
import json
import os
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from models.review_export import export_zip
from models.review_store import (LABEL_RESERVE, Budget, ItemNotFound, ReviewStore, parse_id, resolve_root)

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
DAY = 86_400.0


def fields(verdict: str = "review", raw: float = 1.5) -> dict[str, Any]:
    return {"reason": "review" if verdict == "review" else "audit", "model_version": "1", "engine": "onnx",
            "filename": "a.png", "verdict": verdict, "is_anomalous": verdict != "ok", "raw_score": raw,
            "score": 0.55, "threshold": 1.0, "ng_threshold": 2.0,
            "regions": [{"x": 1, "y": 2, "width": 3, "height": 4, "area": 12, "peak": 0.9, "mean": 0.7}]}


def store(tmp_path: Path, max_bytes: int = 10**9, max_items: int = 1000) -> ReviewStore:
    return ReviewStore(tmp_path / "review", Budget(max_bytes=max_bytes, max_items=max_items, retention_s=7 * DAY,
                                                   label_retention_s=90 * DAY))


def add(s: ReviewStore, image: bytes, verdict: str = "review", at: datetime = T0, category: str = "brick") -> Any:
    return s.add(category, fields(verdict), image, "PNG", (64, 32), b"heat", (16, 16), now=at)


def disk_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name != ".lock")


def test_items_labels_and_who_when(tmp_path: Path) -> None:
    s = store(tmp_path)
    outcome, item_id = add(s, b"image-one")
    assert outcome == "stored" and parse_id(item_id).verdict == "review"
    assert add(s, b"image-one")[0] == "duplicate"  # the same bytes are judged once per category
    assert add(s, b"image-one", category="grass")[0] == "stored"
    item = s.item("brick", item_id)
    assert (item.image.width, item.image.height, item.image.format, item.image.bytes) == (64, 32, "PNG", 9)
    assert s.file("brick", item_id, "image")[0].read_bytes() == b"image-one"
    assert s.file("brick", item_id, "heatmap") == (s.root / "brick" / "items" / item_id / "heatmap.png", "image/png")
    assert [i.id for i in s.pending("brick")[0]] == [item_id]

    label, previous = s.label("brick", item_id, "ng", by="alice", defect_type="scratch", note="edge")
    assert previous is None and label.by == "alice" and label.defect_type == "scratch"
    assert datetime.now(timezone.utc) - label.at < timedelta(seconds=5)
    assert label.model_is_anomalous and label.agrees and s.pending("brick")[0] == []
    relabel, previous = s.label("brick", item_id, "ok", by="bob", defect_type="scratch")
    assert previous == label and relabel.defect_type is None and not relabel.agrees  # OK has no defect type
    assert s.get_label("brick", item_id).by == "bob" and len(s.labels("brick")) == 1
    for bad in ("../../etc", "20260102T030405123456-review-0000000001-abcdef012345/../x", "nope"):
        with pytest.raises(ItemNotFound):
            s.item("brick", bad)
    with pytest.raises(ItemNotFound):
        s.label("brick", "20260102T030405123456-review-0000000001-abcdef012345", "ok", by="x")


def test_pending_filter_and_pages(tmp_path: Path) -> None:
    s = store(tmp_path)
    ids = [add(s, f"img{i}".encode(), verdict, T0 + timedelta(seconds=i))[1]
           for i, verdict in enumerate(["review", "ok", "review", "ng", "review"])]
    reviews = [ids[0], ids[2], ids[4]]
    page, cursor = s.pending("brick", "review", limit=2)
    assert [i.id for i in page] == reviews[:2] and cursor == reviews[1]
    page, cursor = s.pending("brick", "review", after=cursor, limit=2)
    assert [i.id for i in page] == reviews[2:] and cursor is None
    assert [i.id for i in s.pending("brick", "ng")[0]] == [ids[3]]
    assert len(s.pending("brick")[0]) == 5


def test_budget_is_checked_before_writing(tmp_path: Path) -> None:
    s = store(tmp_path, max_items=3)
    assert [add(s, f"x{i}".encode())[0] for i in range(5)] == ["stored"] * 3 + ["full"] * 2
    assert s.usage()[0] == 3
    # bytes: each item counts its files plus the label it may get
    image = b"\0" * 10_000
    one = store(tmp_path / "b")
    add(one, image)
    cost = one.usage()[1]
    assert cost >= 10_000 + LABEL_RESERVE
    tight = store(tmp_path / "c", max_bytes=2 * cost + cost // 2)
    outcomes = [add(tight, image[:-1] + bytes([i]))[0] for i in range(4)]
    assert outcomes == ["stored", "stored", "full", "full"]
    for entry in tight.scan("brick").entries:
        tight.label("brick", entry.id, "ok", by="alice", note="n" * 500)
    assert disk_bytes(tight.root) <= tight.budget.max_bytes  # labels stay inside their reserve
    assert tight.usage()[1] <= tight.budget.max_bytes


def test_retention_prunes_pending_then_labelled_and_orphans(tmp_path: Path) -> None:
    s = store(tmp_path)
    pending = add(s, b"p")[1]
    labelled = add(s, b"l")[1]
    s.label("brick", labelled, "ok", by="alice")
    (s.root / "brick" / "labels" / "20200101T000000000000-ok-0000000001-000000000000.json").write_text("{}")
    stale = s.root / "brick" / "items" / ".tmp-dead"
    stale.mkdir()
    os.utime(stale, (0, 0))
    assert s.prune(now=T0.timestamp() + DAY) == 0 and not stale.exists()  # a dead writer's staging folder
    assert sorted(p.name for p in (s.root / "brick" / "labels").iterdir()) == [f"{labelled}.json"]  # orphan gone
    assert s.prune(now=T0.timestamp() + 8 * DAY) == 1
    assert [e.id for e in s.scan("brick").entries] == [labelled]  # pending expired, the label kept
    assert s.prune(now=T0.timestamp() + 91 * DAY) == 1 and s.usage() == (0, 0)
    assert not list((s.root / "brick" / "labels").iterdir())
    # adding prunes first: an expired store has room again
    small = store(tmp_path / "small", max_items=1)
    add(small, b"old", at=T0)
    assert add(small, b"new", at=T0 + timedelta(days=8))[0] == "stored"


def test_a_half_written_item_is_not_listed(tmp_path: Path) -> None:
    s = store(tmp_path)
    add(s, b"complete")
    (s.root / "brick" / "items" / ".tmp-abc").mkdir()
    (s.root / "brick" / "items" / "not-an-item").mkdir()
    assert len(s.scan("brick").entries) == 1 and len(s.pending("brick")[0]) == 1


def test_export_and_reviewed_ok(tmp_path: Path) -> None:
    s = store(tmp_path)
    a, b, c = (add(s, name, at=T0 + timedelta(seconds=i))[1] for i, name in enumerate((b"a", b"b", b"c")))
    s.label("brick", a, "ok", by="alice")
    s.label("brick", b, "ng", by="alice", defect_type="hole")
    buf = io.BytesIO()
    assert export_zip(s, "brick", buf) == 2
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        names = set(z.namelist())
        rows = [json.loads(line) for line in z.read("labels.jsonl").decode().splitlines()]
        assert z.read(f"good/{a}.png") == b"a"
    assert names == {f"good/{a}.png", f"ng/hole/{b}.png", "labels.jsonl"}
    assert {r["label"]["label"] for r in rows} == {"ok", "ng"} and all(r["item"]["id"] in (a, b) for r in rows)
    assert [item.id for item, _ in s.reviewed_ok_images("brick")] == [a]  # c is pending, b is NG
    assert resolve_root(tmp_path) == tmp_path  # no .review inside: the path is the store itself
    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / ".review").mkdir()
    assert resolve_root(tmp_path / "ms") == tmp_path / "ms" / ".review"
