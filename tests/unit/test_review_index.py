"""What the review store keeps between calls (models/review_index.py), on a real folder: its
own writes need no rereading, anybody else's change is seen at the next call, and nothing
is trusted longer than MAX_AGE_S."""

from __future__ import annotations

import itertools
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from models import review_index
from models.review_index import MAX_AGE_S, PARSED_IDS, StoreIndex, parse_id
from models.review_store import Budget, ReviewStore
from models.review_reader import LABEL_RESERVE

T0 = datetime.now(timezone.utc) - timedelta(hours=1)
_TICKS = itertools.count()
DAY = 86_400.0


def fields(verdict: str = "ok") -> dict[str, Any]:
    return {"reason": "audit", "model_version": "1", "engine": "onnx", "filename": "a.png", "verdict": verdict,
            "is_anomalous": verdict != "ok", "raw_score": 0.5, "score": 0.1, "threshold": 1.0, "ng_threshold": 2.0,
            "regions": []}


def opened(root: Path, max_items: int = 1000, retention_s: float = 7 * DAY) -> ReviewStore:
    return ReviewStore(root, Budget(max_bytes=10**9, max_items=max_items, retention_s=retention_s,
                                    label_retention_s=90 * DAY))


def add(store: ReviewStore, image: bytes, at: datetime | None = None) -> str:
    """Each item a millisecond after the last (ids sort by capture time)."""
    at = at or T0 + timedelta(milliseconds=next(_TICKS))
    outcome, item_id = store.add("brick", fields(), image, "PNG", (8, 8), None, None, now=at)
    assert outcome == "stored" and item_id is not None, outcome
    return item_id


class Reads:
    """Counts the directory reads the index makes (its one way to the disk's listing)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = review_index._names

        def counted(path: Path) -> list[str]:
            self.count += 1
            return real(path)
        monkeypatch.setattr(review_index, "_names", counted)


def test_ids_parse_to_what_they_say_and_nothing_else() -> None:
    entry = parse_id("20260102T030405123456-ng-0000004096-0123456789ab")
    assert entry is not None and (entry.verdict, entry.bytes, entry.digest) == ("ng", 4096, "0123456789ab")
    assert entry.captured == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc).timestamp()
    for bad in ("20261302T030405123456-ng-0000004096-0123456789ab",  # month 13
                "20260102T030405123456-maybe-0000004096-0123456789ab", "labels", ".tmp-abc"):
        assert parse_id(bad) is None, bad


def test_own_writes_need_no_rereading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = opened(tmp_path, max_items=3)
    add(store, b"a")
    assert len(store.scan("brick").entries) == 1
    reads = Reads(monkeypatch)
    ids = [add(store, image) for image in (b"b", b"c")]
    assert [e.id for e in store.scan("brick").entries][1:] == ids
    assert store.usage()[0] == 3 and store.add("brick", fields(), b"d", "PNG", (8, 8), None, None)[0] == "full"
    assert store.refusal("brick", b"e") == "full" and store.refusal("brick", b"a") == "duplicate"
    assert reads.count == 0  # a full store answers from memory: its size no longer prices a capture


def test_other_writers_changes_are_seen_at_the_next_call(tmp_path: Path) -> None:
    mine, theirs = opened(tmp_path), opened(tmp_path)  # two processes (replicas, a worker) on one store
    first = add(mine, b"a")
    assert [e.id for e in mine.scan("brick").entries] == [first]
    second = add(theirs, b"b")
    assert [e.id for e in mine.scan("brick").entries] == [first, second]
    assert mine.refusal("brick", b"b") == "duplicate"
    theirs.label("brick", second, "ng", by="alice")  # labels are written without the store's lock
    assert mine.scan("brick").labelled == {second} and [lab.label for lab in mine.labels("brick")] == ["ng"]
    theirs.label("brick", second, "ok", by="bob")  # a relabel replaces the file
    assert [(lab.label, lab.by) for lab in mine.labels("brick")] == [("ok", "bob")]
    shutil.rmtree(tmp_path / "brick" / "items" / first)  # an operator's hand
    assert [e.id for e in mine.scan("brick").entries] == [second] and mine.usage()[0] == 1


def test_an_unseen_change_is_trusted_no_longer_than_max_age(tmp_path: Path) -> None:
    now = [0.0]
    store = opened(tmp_path)
    index = store._index = StoreIndex(store.root, clock=lambda: now[0])
    kept = add(store, b"a")
    other = add(opened(tmp_path), b"b")
    assert len(index.scan("brick").entries) == 2
    # A file system with coarse timestamps: another process swaps one item for another within
    # the same tick, and the folder's stat comes out as it was.
    items = tmp_path / "brick" / "items"
    before = os.stat(items)
    shutil.rmtree(items / other)
    (items / other.replace(other[-12:], "f" * 12)).mkdir()
    os.utime(items, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(items).st_mtime_ns == before.st_mtime_ns and os.stat(items).st_nlink == before.st_nlink
    now[0] += MAX_AGE_S / 2
    assert other in {e.id for e in index.scan("brick").entries}  # not seen yet: the stat is all it checks
    now[0] += MAX_AGE_S
    assert {e.id for e in index.scan("brick").entries} == {kept, other[:-12] + "f" * 12}


def test_expired_items_make_room_before_the_store_says_full(tmp_path: Path) -> None:
    store = opened(tmp_path, max_items=2, retention_s=DAY)
    add(store, b"old", at=datetime.now(timezone.utc) - timedelta(days=2))
    add(store, b"recent")
    assert store.refusal("brick", b"new") is None  # the old one goes first, as add() does
    assert store.add("brick", fields(), b"new", "PNG", (8, 8), None, None)[0] == "stored"
    assert store.usage()[0] == 2 and store.refusal("brick", b"newer") == "full"


def test_one_category_cannot_take_the_whole_store_from_the_others(tmp_path: Path) -> None:
    """A line in a defect wave filled the whole store with its own items, and every other
    category's captures were refused "full" until an operator labelled or retention ran. Now
    one category holds at most its share (MSFLOW_REVIEW_CATEGORY_SHARE) of the items and bytes."""
    store = ReviewStore(tmp_path, Budget(max_bytes=10**9, max_items=4, retention_s=7 * DAY,
                                         label_retention_s=90 * DAY, category_share=0.5))
    add(store, b"busy-1")
    add(store, b"busy-2")
    assert store.refusal("brick", b"busy-3") == "category_full"
    assert store.add("brick", fields(), b"busy-3", "PNG", (8, 8), None, None)[0] == "category_full"
    for image in (b"quiet-1", b"quiet-2"):
        assert store.refusal("grass", image) is None
        assert store.add("grass", fields(), image, "PNG", (8, 8), None, None)[0] == "stored"
    assert store.usage()[0] == 4 and store.refusal("gravel", b"other") == "full"
    by_bytes = ReviewStore(tmp_path / "bytes", Budget(max_bytes=10 * LABEL_RESERVE, max_items=100,
                                                     retention_s=7 * DAY, label_retention_s=90 * DAY,
                                                     category_share=0.5))
    assert by_bytes.refusal("brick", b"x" * 6 * LABEL_RESERVE) == "category_full"  # more than half the bytes alone
    assert by_bytes.refusal("brick", b"x" * 100) is None


def test_labels_are_parsed_again_only_when_their_file_changed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = opened(tmp_path)
    ids = [add(store, bytes([i])) for i in range(5)]
    for item_id in ids:
        store.label("brick", item_id, "ok", by="alice")
    assert len(store.labels("brick")) == 5
    parsed: list[str] = []
    real = review_index.LabelCache.__init__

    def counting(self: Any, read: Any) -> None:
        real(self, lambda path: (parsed.append(path), read(path))[1])
    monkeypatch.setattr(review_index.LabelCache, "__init__", counting)
    fresh = opened(tmp_path)
    assert len(fresh.labels("brick")) == 5 and len(parsed) == 5
    assert len(fresh.labels("brick")) == 5 and len(parsed) == 5  # nothing changed: nothing read
    fresh.label("brick", ids[2], "ng", by="bob")
    assert [lab.label for lab in fresh.labels("brick")] == ["ok", "ok", "ng", "ok", "ok"]
    assert len(parsed) == 6  # the one replaced file, not the others


def test_readers_and_two_writers_at_once_end_in_the_store_as_it_is(tmp_path: Path) -> None:
    """The API's threads read while the review thread writes and another process writes too:
    whatever interleaving, the index ends where a fresh reading of the folders is."""
    import threading

    mine, theirs = opened(tmp_path, max_items=10_000), opened(tmp_path, max_items=10_000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                scan = mine.scan("brick")
                assert len(scan.digests) == len(scan.entries)  # a snapshot is consistent in itself
                assert scan.bytes == sum(e.bytes for e in scan.entries)
                mine.labels("brick")
                mine.usage()
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)

    def writer(store: ReviewStore, tag: bytes, labelled: bool) -> None:
        try:
            for i in range(60):
                item_id = add(store, tag + b"%d" % i)
                if labelled and i % 3 == 0:
                    store.label("brick", item_id, "ok", by="alice")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(mine, b"m", True)),
               threading.Thread(target=writer, args=(theirs, b"t", False))]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    truth = opened(tmp_path).scan("brick")
    seen = mine.scan("brick")
    assert len(truth.entries) == 120
    assert seen.entries == truth.entries and seen.labelled == truth.labelled and seen.bytes == truth.bytes
    assert len(mine.labels("brick")) == 20


def test_the_remembered_parses_stay_within_their_bound() -> None:
    parse_id.cache_clear()
    ids = [f"20260102T0304{i:08d}-ok-0000004096-{i:012x}" for i in range(PARSED_IDS + 5_000)]
    assert all(parse_id(i) is not None for i in ids)
    assert parse_id.cache_info().currsize == PARSED_IDS  # the oldest went; each still parses when asked
    assert parse_id(ids[0]) == parse_id(ids[0]) and parse_id(ids[0]).digest == f"{0:012x}"


def test_the_label_cache_holds_only_the_labels_of_items_still_there(tmp_path: Path) -> None:
    store = opened(tmp_path, retention_s=DAY)
    old = add(store, b"old", at=datetime.now(timezone.utc) - timedelta(days=2))
    store.label("brick", old, "ok", by="alice")  # labelled: kept for 90 days
    kept = add(store, b"kept")
    store.label("brick", kept, "ok", by="alice")
    assert len(store.labels("brick")) == 2
    assert store.prune(now=time.time() + 89 * DAY) == 1  # the older one past the labelled retention
    assert [lab.id for lab in store.labels("brick")] == [kept]
    cache = store._labels["brick"]
    assert len(cache._held) == 1  # the expired item's label is no longer held


def test_a_reading_kept_late_never_hides_another_processes_item(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An API thread's reading that began before another process added X ends while this
    process's review thread writes Y under the lock. Built on that old listing and stamped
    with the folder's new stat, the write's snapshot hid X for MAX_AGE_S: its bytes
    uncounted, its duplicate missed, and prune swept its operator's label as an orphan."""
    import threading

    from models import review_store

    mine, theirs = opened(tmp_path), opened(tmp_path)  # this server process; another replica
    add(mine, b"A")
    mine.scan("brick")
    add(theirs, b"W")  # what mine holds is stale now: the reader below reads the folder again
    listed, go_on = threading.Event(), threading.Event()
    real_labelled, real_fsync_dir = review_index._labelled, review_store.fsync_folder

    def reader_pauses(path: Path) -> frozenset[str]:  # between its listing and keeping it
        out = real_labelled(path)
        if threading.current_thread().name == "api-reader":
            listed.set()
            go_on.wait(10)
        return out
    monkeypatch.setattr(review_index, "_labelled", reader_pauses)
    reader = threading.Thread(target=mine.scan, args=("brick",), name="api-reader")
    reader.start()
    assert listed.wait(10)
    x = add(theirs, b"X")  # after the reader listed the folder

    def reader_ends_during_the_write(path: Path) -> None:  # Y is in place, its snapshot not yet kept
        if not go_on.is_set():
            go_on.set()
            reader.join(10)
        real_fsync_dir(path)
    monkeypatch.setattr(review_store, "fsync_folder", reader_ends_during_the_write)
    add(mine, b"Y")
    assert go_on.is_set() and not reader.is_alive()
    monkeypatch.undo()

    truth = opened(tmp_path)
    assert x in {e.id for e in mine.scan("brick").entries}
    assert mine.scan("brick").entries == truth.scan("brick").entries and mine.usage() == truth.usage()
    assert mine.refusal("brick", b"X") == "duplicate"
    theirs.label("brick", x, "ng", by="alice", defect_type="scratch")
    mine.prune()
    assert (tmp_path / "brick" / "labels" / f"{x}.json").is_file()  # an operator's label is never swept


def test_a_reading_never_replaces_a_later_one(tmp_path: Path) -> None:
    """Snapshots are kept in the order their stat was taken: an old listing kept last does
    not overwrite a newer one (the newer is what the next calls answer from)."""
    now = [0.0]
    store = opened(tmp_path)
    index = store._index = StoreIndex(store.root, clock=lambda: now[0])
    first = add(store, b"a")
    old = index._held["brick"]
    second = add(opened(tmp_path), b"b")
    assert [e.id for e in index.scan("brick").entries] == [first, second]
    newer = index._held["brick"]
    index._keep("brick", old)  # a slow reader's reading, from before the other process's write
    assert index._held["brick"] is newer and [e.id for e in index.scan("brick").entries] == [first, second]


def test_own_labels_are_seen_at_once_where_timestamps_are_coarse(tmp_path: Path) -> None:
    """A label this process writes is in its next answer however coarse the file system's
    timestamps (1 s on ext3 and many NFS servers, a 4 ms tick on older kernels). The writer
    kept the snapshot it held, the labels folder's stat came out as before, and for up to
    MAX_AGE_S the item just labelled stayed pending (a second reviewer labelled it again) and
    a relabel was not counted (the PUT's own stats, the gauges)."""
    store = opened(tmp_path)
    first, second = add(store, b"a"), add(store, b"b")
    labels = tmp_path / "brick" / "labels"

    def within_the_same_tick(write: Any) -> None:
        before = os.stat(labels)
        write()
        os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(labels)
        assert (after.st_ino, after.st_mtime_ns, after.st_nlink, after.st_size) == (
            before.st_ino, before.st_mtime_ns, before.st_nlink, before.st_size)

    store.label("brick", first, "ok", by="alice")
    assert [e.id for e in store.scan("brick").pending] == [second] and len(store.labels("brick")) == 1
    within_the_same_tick(lambda: store.label("brick", second, "ng", by="bob"))
    assert store.scan("brick").pending == []
    within_the_same_tick(lambda: store.label("brick", first, "ng", by="bob"))  # a relabel
    assert [(lab.id, lab.label) for lab in store.labels("brick")] == [(first, "ng"), (second, "ng")]
