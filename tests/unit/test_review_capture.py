"""The review capture's writer (service/pipeline/review.py) on a real store: many captures in
a second read the store's tallies for the gauges once or twice, not once per capture, and
the gauges still come to the truth."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any
from pathlib import Path

import numpy as np

from models.manifest import Calibration, ScoreStats
from service.config import Settings
from service.metrics import ServiceMetrics
from service.pipeline.item import InspectedImage
from service.pipeline.review import REFRESH_AFTER_WRITES_S, ReviewCapture
from service.schemas import ImageResult

STATS = ScoreStats(count=4, mean=1.0, std=0.1, min=0.8, p50=1.0, p95=1.2, p99=1.3, max=1.3)
COLOURS = Calibration(score_output="image_score_log", method="target_fpr", threshold=2.0, score_min=1.0,
                      score_max=3.0, normal_scores=STATS, map_low=0.0, map_high=1.0, pixel_threshold=0.5)


def answered(i: int) -> InspectedImage:
    item = InspectedImage(index=0, filename=f"{i}.png", data=b"image %d" % i, format="PNG", width=16, height=16)
    item.tensor = np.zeros((16, 16, 3), np.uint8)
    item.anomaly_map = np.zeros((16, 16), np.float32)
    item.raw_score = 1.0
    item.result = ImageResult(index=0, filename=item.filename, score=0.2, raw_score=1.0, threshold=2.0,
                              is_anomalous=False, verdict="ok", ng_threshold=2.5, model_version="1", batch_size=1,
                              heatmap=None, timings_ms={"decode": 1, "queue": 1, "engine": 1, "render": 1, "total": 4},
                              image_size={"width": 16, "height": 16}, regions=[])
    return item


def test_a_burst_of_captures_refreshes_the_gauges_once_or_twice(tmp_path: Path) -> None:
    metrics = ServiceMetrics()
    capture = ReviewCapture(Settings(model_store=tmp_path, review_audit_rate=1.0, review_scan_s=3600.0), metrics)
    tallied: list[float] = []
    real = capture._tallies

    def counting(only: str | None) -> object:
        tallied.append(time.monotonic())
        return real(only)
    capture._tallies = counting  # type: ignore[method-assign]

    def stored() -> float:
        return sum(s.value for m in metrics.review_captures.collect() for s in m.samples
                   if s.name.endswith("_total") and s.labels["outcome"] == "stored")

    def pending() -> float:
        return next((s.value for m in metrics.review_pending.collect() for s in m.samples
                     if s.labels.get("category") == "brick"), 0.0)

    async def burst() -> None:
        capture.start()
        await asyncio.sleep(0.1)  # the maintenance loop's first pass (one refresh)
        first = len(tallied)
        started = time.monotonic()
        for i in range(20):  # one at a time, as answers arrive: every offer wakes the writer
            capture.offer("brick", "onnx", COLOURS, [answered(i)])
            await asyncio.sleep(0.005)
        while stored() < 20 and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
        assert stored() == 20
        in_burst = [t for t in tallied[first:] if t - started < REFRESH_AFTER_WRITES_S]
        assert len(in_burst) <= 2, len(in_burst)  # was one per wake-up: up to 20
        await asyncio.sleep(REFRESH_AFTER_WRITES_S + 0.3)
        assert pending() == 20  # the trailing refresh brought the gauge to the store's state
        await capture.stop()

    asyncio.run(burst())


def test_a_capture_hashes_its_image_once(tmp_path: Path, monkeypatch) -> None:
    """The writer asks the store whether it would refuse, then adds: one digest serves both
    (it hashed the image twice); the same image offered again is still refused as a duplicate."""
    import models.review_store as review_store
    import service.pipeline.review as review

    hashed: list[bytes] = []
    real = review_store.image_digest

    def counting(image: bytes) -> str:
        hashed.append(image)
        return real(image)
    monkeypatch.setattr(review_store, "image_digest", counting)
    monkeypatch.setattr(review, "image_digest", counting)
    metrics = ServiceMetrics()
    capture = ReviewCapture(Settings(model_store=tmp_path, review_audit_rate=1.0, review_scan_s=3600.0), metrics)

    def outcomes() -> dict[str, float]:
        return {s.labels["outcome"]: s.value for m in metrics.review_captures.collect() for s in m.samples
                if s.name.endswith("_total")}

    async def twice() -> None:
        capture.start()
        for done, i in enumerate((1, 2, 1), start=1):  # the third is the first again, once it is stored
            capture.offer("brick", "onnx", COLOURS, [answered(i)])
            started = time.monotonic()
            while sum(outcomes().values()) < done and time.monotonic() - started < 10:
                await asyncio.sleep(0.01)
        await capture.stop()

    asyncio.run(twice())
    assert outcomes().get("stored") == 2 and outcomes().get("duplicate") == 1, outcomes()
    assert sorted(hashed) == sorted([b"image 1", b"image 2", b"image 1"]), hashed  # once per capture


def test_a_queued_capture_holds_no_answer_heatmap(tmp_path: Path) -> None:
    """The queue's byte budget counts the upload and the model-size arrays; a queued record
    must hold nothing more. The answer's rendered heatmap (an original-size overlay, up to
    ~16 MB) and its base64 copy in an inline answer stay with the caller's record: 16 such
    items counted 29 KB against a 2 MiB budget and pinned ~149 MiB. The writer renders its own."""
    import os

    from service.pipeline.postprocess import inline_heatmap

    budget = 2 << 20
    metrics = ServiceMetrics()
    capture = ReviewCapture(Settings(model_store=tmp_path, review_audit_rate=1.0, review_scan_s=3600.0,
                                     review_queue_bytes=budget, review_queue_items=32), metrics)

    def pinned(item: InspectedImage) -> int:
        """The bytes a record keeps alive, counted here from what it holds."""
        heatmap = item.result.heatmap if item.result is not None else None
        return (len(item.data) + len(item.heatmap_png or b"") + len(getattr(heatmap, "data", "") or "")
                + sum(a.nbytes for a in (item.tensor, item.anomaly_map) if a is not None))

    async def offer_then_write() -> None:
        capture.start()
        await asyncio.sleep(0.05)
        items = []
        for i in range(16):
            item = answered(i)
            item.heatmap_png = os.urandom(4 << 20)  # heatmap_size=original
            item.heatmap_width = item.heatmap_height = 1024
            item.result = item.result.model_copy(update={"heatmap": inline_heatmap(item)})  # heatmap=inline
            items.append(item)
        capture.offer("brick", "onnx", COLOURS, items)  # synchronous: the writer has not run yet
        queued = [kept.item for kept in capture._queue]
        assert len(queued) == 16
        assert all(q.heatmap_png is None and q.result.heatmap is None for q in queued)
        assert sum(pinned(q) for q in queued) <= budget  # what the queue holds is what it counted
        assert capture._bytes == sum(pinned(q) for q in queued)
        # the caller's records are untouched: they are still being answered from
        assert all(len(i.heatmap_png) == 4 << 20 and i.result.heatmap is not None for i in items)
        started = time.monotonic()
        while capture._queue and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
        await capture.stop()

    asyncio.run(offer_then_write())
    items = list((tmp_path / ".review" / "brick" / "items").iterdir())
    assert len(items) == 16
    assert all((d / "heatmap.png").stat().st_size > 0 for d in items)  # rendered by the writer itself


def test_stop_waits_for_the_capture_being_written(tmp_path: Path) -> None:
    """stop() waited for the queue to empty, then cancelled the writer: the capture it had just
    taken off the queue, still waiting for the review thread, was neither written nor counted
    (1 of 16 in about 4 stops right after a burst)."""
    metrics = ServiceMetrics()
    capture = ReviewCapture(Settings(model_store=tmp_path, review_audit_rate=1.0, review_scan_s=3600.0), metrics)
    real_write = capture._write

    def slow_write(kept: Any) -> str:
        time.sleep(0.3)  # a large heatmap, a slow disk
        return real_write(kept)
    capture._write = slow_write  # type: ignore[method-assign]

    async def offer_then_stop() -> None:
        capture.start()
        await asyncio.sleep(0.05)
        capture.offer("brick", "onnx", COLOURS, [answered(i) for i in range(2)])
        while capture._queue:  # both taken: the second one in hand
            await asyncio.sleep(0.01)
        await capture.stop()

    asyncio.run(offer_then_stop())
    outcomes = {s.labels["outcome"]: s.value for m in metrics.review_captures.collect() for s in m.samples
                if s.name.endswith("_total")}
    assert outcomes == {"stored": 2}
    assert len(list((tmp_path / ".review" / "brick" / "items").iterdir())) == 2


def test_review_gauges_follow_labels_and_categories_that_leave_the_store(tmp_path: Path) -> None:
    """Retention removed every label scored by version 1: GET .../stats then listed no
    disagreement for it, while msflow_review_disagreements{version="1",kind="false_negative"}
    stayed 1 until a restart (the refresh only set the versions still labelled). A category
    folder removed from the review store kept its pending and label gauges the same way."""
    metrics = ServiceMetrics()
    capture = ReviewCapture(Settings(model_store=tmp_path, review_retention_s=60.0, review_label_retention_s=60.0),
                            metrics)
    fields = {"reason": "review", "model_version": "1", "verdict": "ok", "is_anomalous": False, "raw_score": 1.0,
              "score": 0.5, "threshold": 1.0, "ng_threshold": 2.0}
    _, brick_id = capture.store.add("brick", fields, b"brick part", "PNG", (4, 4), None, None)
    capture.store.label("brick", brick_id, "ng", by="alice")
    capture.store.add("tile", fields, b"tile part", "PNG", (4, 4), None, None)

    def series() -> dict[tuple[str, ...], float]:
        return {(family.name, *sorted(s.labels.values())): s.value
                for gauge in (metrics.review_pending, metrics.review_labels, metrics.review_disagreements)
                for family in gauge.collect() for s in family.samples}

    asyncio.run(capture.refresh())
    assert series()[("msflow_review_disagreements", "1", "brick", "false_negative")] == 1
    assert series()[("msflow_review_pending", "tile")] == 1

    capture.store.prune(time.time() + 120)  # both items past their retention
    shutil.rmtree(tmp_path / ".review" / "tile")
    asyncio.run(capture.refresh())
    assert series() == {("msflow_review_pending", "brick"): 0, ("msflow_review_labels", "brick", "ok"): 0,
                        ("msflow_review_labels", "brick", "ng"): 0}
