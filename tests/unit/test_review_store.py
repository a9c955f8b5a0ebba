"""The review store on a real temporary folder: items, labels, budget, retention, export."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from models.review_export import export_zip
from models.image_acceptance import ACCEPTED_FORMATS
from models.review_leftovers import ORPHAN_GRACE_S, STALE_S
from models.review_store import (IMAGE_TYPES, LABEL_RESERVE, Budget, ItemNotFound, ReviewStore, id_stamp, parse_id,
                                 resolve_root)

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
    add(s, b"p")  # pending
    labelled = add(s, b"l")[1]
    s.label("brick", labelled, "ok", by="alice")
    orphan = s.root / "brick" / "labels" / "20200101T000000000000-ok-0000000001-000000000000.json"
    orphan.write_text("{}")
    os.utime(orphan, (0, 0))  # older than the orphan's grace period
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


def test_what_a_killed_writer_leaves_counts_until_swept(tmp_path: Path) -> None:
    """A writer killed mid-item leaves its staging folder (an image of MBs) and one killed
    mid-label a label's temporary file. Neither is an item, yet the staging folder's bytes
    are disk the budget must count until prune sweeps them; the temporary file is swept too
    (it was never removed)."""
    s = store(tmp_path, max_bytes=3_000_000)
    now = datetime.now(timezone.utc)
    first = add(s, b"first", at=now)[1]
    items, used = s.usage()
    staging = s.root / "brick" / "items" / ".tmp-0123456789ab"  # as add() names it, killed after the image
    staging.mkdir()
    (staging / "image.png").write_bytes(os.urandom(2_000_000))
    label_tmp = s.root / "brick" / "labels" / f".{first}.0badc0de.tmp"  # killed before its rename
    label_tmp.parent.mkdir(parents=True, exist_ok=True)
    label_tmp.write_bytes(b"{}")
    assert s.usage() == (items, used + 2_000_000)
    assert add(s, os.urandom(1_500_000), at=now)[0] == "full"  # was stored: 3.5 MB on disk against 3 MB
    assert disk_bytes(s.root) <= s.budget.max_bytes

    s.prune(now=time.time() + STALE_S / 2)  # a live writer's files are never swept
    assert staging.exists() and label_tmp.exists()
    s.prune(now=time.time() + STALE_S + 60)
    assert not staging.exists() and not label_tmp.exists()
    assert s.usage() == (items, used) and [e.id for e in s.scan("brick").entries] == [first]
    assert add(s, os.urandom(1_500_000), at=now)[0] == "stored"


def test_a_label_is_swept_only_once_its_item_is_gone_and_the_grace_has_passed(tmp_path: Path) -> None:
    """The snapshot prune works from may lag the folder (another process's new item, a coarse
    timestamp): a label whose item folder exists is no orphan. A label without its item is
    kept ORPHAN_GRACE_S, then swept."""
    import shutil

    now = datetime.now(timezone.utc)
    s = store(tmp_path)
    kept, gone = add(s, b"kept", at=now)[1], add(s, b"gone", at=now)[1]
    s.label("brick", kept, "ok", by="alice")
    assert {e.id for e in s.scan("brick").entries} == {kept, gone}
    # Another process swaps one item for another within one timestamp tick: the folder's stat
    # comes out as it was, so the snapshot still lists `gone` and not `hidden`.
    items = s.root / "brick" / "items"
    before = os.stat(items)
    hidden = gone[:-12] + "f" * 12
    shutil.rmtree(items / gone)
    (items / hidden).mkdir()
    os.utime(items, ns=(before.st_atime_ns, before.st_mtime_ns))
    labels = s.root / "brick" / "labels"
    young, old = (f"{id_stamp(now)[:-6]}{n:06d}-ok-0000004096-{n:012x}" for n in (1, 2))
    long_ago = time.time() - ORPHAN_GRACE_S - 60
    for item_id, mtime in ((hidden, long_ago), (young, time.time()), (old, long_ago)):
        (labels / f"{item_id}.json").write_text("{}")
        os.utime(labels / f"{item_id}.json", (mtime, mtime))
    assert hidden not in {e.id for e in s.scan("brick").entries}  # the lagging snapshot
    s.prune()
    assert sorted(p.name[:-5] for p in labels.iterdir()) == sorted([kept, hidden, young])


def test_a_missing_image_file_is_not_found(tmp_path: Path) -> None:
    """A prune killed mid-rmtree, or an expiry racing the read, leaves item.json without its
    image: the item's files are not found (the API's 404), not a server error."""
    s = store(tmp_path)
    item_id = add(s, b"image")[1]
    (s.root / "brick" / "items" / item_id / "image.png").unlink()
    (s.root / "brick" / "items" / item_id / "heatmap.png").unlink()
    for which in ("image", "heatmap"):
        with pytest.raises(ItemNotFound):
            s.file("brick", item_id, which)
    assert s.item("brick", item_id).id == item_id  # the record itself still reads


def test_a_label_waits_for_a_retention_sweep_under_way_and_is_refused_if_it_took_the_item(tmp_path: Path) -> None:
    """Retention removes items under the store's lock (another process's sweep too). A label
    that came in while the sweep was removing its item was written beside it, found the item's
    folder not yet gone, answered 200 and was then deleted with it: the operator's verdict lost."""
    s = store(tmp_path)
    _, item_id = add(s, b"image-one", at=datetime.now(timezone.utc))
    outcome: dict[str, Any] = {}

    def label() -> None:
        try:
            outcome["label"] = s.label("brick", item_id, "ok", by="alice")
        except ItemNotFound as exc:
            outcome["refused"] = exc

    with s._locked():  # a sweep under way in another process
        labeller = threading.Thread(target=label)
        labeller.start()
        labeller.join(0.5)
        assert labeller.is_alive(), "the label did not wait for the sweep holding the store's lock"
        shutil.rmtree(s.root / "brick" / "items" / item_id)  # the sweep takes the item
    labeller.join(10)
    assert "refused" in outcome and "label" not in outcome
    assert not (s.root / "brick" / "labels" / f"{item_id}.json").exists()


def test_a_multi_picture_jpeg_is_kept_as_a_jpeg(tmp_path: Path) -> None:
    """The server accepts MPO (the multi-picture JPEG many cameras and phones write; Pillow
    names such a file MPO, not JPEG). The store knew no MPO: it kept the image as image.bin,
    served it as application/octet-stream (nosniff: a browser may refuse to show it) and
    exported it as good/<id>.bin, which `msflow train --data` does not read as an image."""
    assert set(IMAGE_TYPES) == ACCEPTED_FORMATS  # every format the server takes has a name and a media type
    s = store(tmp_path)
    item_id = s.add("brick", fields("review"), b"\xff\xd8mpo", "MPO", (64, 32), None, None, now=T0)[1]
    image = s.item("brick", item_id).image
    assert (image.file, image.media_type, image.format) == ("image.jpg", "image/jpeg", "MPO")
    assert s.file("brick", item_id, "image") == (s.root / "brick" / "items" / item_id / "image.jpg", "image/jpeg")


def test_an_item_whose_image_is_gone_takes_no_label(tmp_path: Path) -> None:
    """item.json without its image (a prune killed mid-rmtree, a hand on the volume): the
    operator saw no image, and recalibrate and train leave such a label out. It was answered
    200 and counted in the stats (labelled, agreement, disagreements) all the same."""
    s = store(tmp_path)
    item_id = add(s, b"image")[1]
    (s.root / "brick" / "items" / item_id / "image.png").unlink()
    with pytest.raises(ItemNotFound, match="no image"):
        s.label("brick", item_id, "ok", by="alice")
    assert s.get_label("brick", item_id) is None and s.labels("brick") == []


def test_an_item_written_after_a_page_was_read_is_on_the_next_page(tmp_path: Path) -> None:
    """Ids order a category's pending items for a reviewer paging by the ``after`` cursor. A
    writer's moment is taken before the store's lock (and clocks step back), so a writer that
    stamped earlier could write after another: its id sorted before the cursor a reviewer had
    already been given, and the queue skipped it for good."""
    s = store(tmp_path)
    later = add(s, b"later-writer-first", at=T0 + timedelta(seconds=5))[1]
    page, _ = s.pending("brick")
    assert [i.id for i in page] == [later]
    earlier = add(s, b"earlier-stamp-written-second", at=T0)[1]  # it waited for the lock
    assert [i.id for i in s.pending("brick", after=later)[0]] == [earlier]
    assert s.item("brick", earlier).captured_at == T0  # what it says of itself stays true


def test_an_item_whose_image_file_is_truncated_is_not_judged_or_used(tmp_path: Path) -> None:
    """An image file shorter than its item.json says (a copy cut short, a damaged volume):
    a reviewer was served half a picture and its label was taken (200), the label export
    zipped the half image as a good example, and recalibrate stopped on it ("cannot be
    decoded (image file is truncated)"). It is a damaged item now, as one whose image is gone."""
    s = store(tmp_path)
    kept, cut = (add(s, image, at=T0 + timedelta(seconds=i))[1] for i, image in enumerate((b"whole", b"cut-short")))
    s.label("brick", cut, "ok", by="alice")
    s.label("brick", kept, "ok", by="alice")
    image = s.root / "brick" / "items" / cut / "image.png"
    image.write_bytes(image.read_bytes()[:4])
    with pytest.raises(ItemNotFound, match="damaged"):
        s.file("brick", cut, "image")
    with pytest.raises(ItemNotFound, match="damaged"):
        s.label("brick", cut, "ng", by="bob")
    assert s.get_label("brick", cut).by == "alice"  # the label it had stays, unused
    assert [item.id for item, _, _ in s.labelled("brick")] == [kept]
    assert [item.id for item, _ in s.reviewed_ok_images("brick")] == [kept]
    buf = io.BytesIO()
    export_zip(s, "brick", buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        assert set(z.namelist()) == {f"good/{kept}.png", "labels.jsonl"}


def test_a_label_file_that_names_another_item_is_not_that_items_label(tmp_path: Path) -> None:
    """A label file is read from a shared volume: ``labels/<b>.json`` holding ``a``'s label (a
    copy by hand, a restore into the wrong name) counted ``a`` twice (stats, the label export
    with two zip entries of one name, recalibrate and train) and ``b`` as labelled by nobody."""
    s = store(tmp_path)
    a, b = (add(s, image, at=T0 + timedelta(seconds=i))[1] for i, image in enumerate((b"a", b"b")))
    s.label("brick", a, "ng", by="alice", defect_type="hole")
    labels = s.root / "brick" / "labels"
    (labels / f"{b}.json").write_bytes((labels / f"{a}.json").read_bytes())
    shutil.copytree(s.root / "brick", s.root / "grass")  # another category's copy of the folder
    assert [lab.id for lab in s.labels("brick")] == [a]
    assert [item.id for item, _, _ in s.labelled("brick")] == [a]
    assert s.get_label("brick", b) is None
    assert s.labels("grass") == [] and s.get_label("grass", a) is None
    buf = io.BytesIO()
    assert export_zip(s, "brick", buf) == 1
