"""The review loop end to end on a real ``msflow serve``: inspect a mix of parts so that some
land in review, label them through the API, run ``msflow recalibrate`` as a subprocess, and
check that the new version is served, that the labelled parts' verdicts move as the labels
say, and every number of the printed before/after table. Then the review store's budget
under a burst and labels across a restart, and the ng bound shared through Redis."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.calibrate import just_above
from models.data import MVTecCategory, Sample, folder_of_good_images
from models.data_loading import load_images
from models.manifest import Manifest
from harness import (ADMIN_KEY, CATEGORY, USER_KEY, RedisServer, assert_error, metric, png_variant, start,
                     upload, wait_for_metric, wait_until)

REVIEWER = "alice"
REVIEWER_KEY = "reviewer-key-789"
REVIEW = f"/v1/review/{CATEGORY}"


def onnx_scores(version_dir: Path, paths: list[Path]) -> np.ndarray:
    """Raw scores of images by the version's ONNX graph, outside the server (the test's own count)."""
    import onnxruntime as ort

    man = Manifest.read(version_dir)
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    images = load_images([Sample(path=p, label=0, defect_type="good") for p in paths], man.input_size)
    return session.run([man.calibration.score_output], {"images": images})[0].astype(np.float64)


@pytest.fixture(scope="module")
def parts(demo_root: Path) -> list[tuple[Path, str, str | None]]:
    """(image, operator's label, defect type): the good test parts and the visible defects."""
    samples = MVTecCategory(demo_root, CATEGORY).test_samples()
    return [(s.path, "ok" if s.label == 0 else "ng", None if s.label == 0 else s.defect_type)
            for s in samples if s.label == 0 or s.tier == "visible"]


@pytest.fixture(scope="module")
def loop_store(model_store: Path, parts: list[tuple[Path, str, str | None]],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's model as version 1, with a review band wide enough to hold half the parts:
    a quarter of them below it (ok), a quarter above (ng), the bounds half way between scores."""
    store = tmp_path_factory.mktemp("review-loop") / "store"
    shutil.copytree(model_store, store, ignore=shutil.ignore_patterns(".review"))
    v1 = store / CATEGORY / "1"
    ranked = np.sort(onnx_scores(v1, [p for p, _, _ in parts]))
    assert len(ranked) >= 8 and np.all(np.diff(ranked) > 0), ranked
    q = len(ranked) // 4
    ok, ng = (ranked[q - 1] + ranked[q]) / 2, (ranked[-q - 1] + ranked[-q]) / 2
    man = Manifest.read(v1)
    man.model_copy(update={"calibration": man.calibration.model_copy(update={
        "threshold": float(ok), "ng_threshold": float(ng), "ng_method": "margin"})}).write(v1)
    return store


def name_of(path: Path) -> str:
    """The upload name: test/good/000.png and test/hole/000.png must not meet."""
    return f"{path.parent.name}-{path.name}"


def label_of(parts: list[tuple[Path, str, str | None]]) -> dict[str, tuple[str, str | None]]:
    return {name_of(p): (lab, defect) for p, lab, defect in parts}


def inspect_all(client: httpx.Client, parts: list[tuple[Path, str, str | None]]) -> dict[str, dict[str, Any]]:
    out = {}
    for path, _, _ in parts:
        r = client.post(f"/v1/inspect/{CATEGORY}?heatmap=none", files=[upload(name_of(path), path.read_bytes())])
        assert r.status_code == 200, r.text
        (res,) = r.json()["results"]
        out[name_of(path)] = res
    return out


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}(\S+)\s+(\S+)$", line)
        if m:
            rows[m.group(1).strip()] = (m.group(2), m.group(3))
    return rows


def expected_rows(labels: list[str], scores: np.ndarray, normals: np.ndarray, ok: float, ng: float) -> dict[str, str]:
    """Every figure of one column of the table, counted here from the served scores."""
    lab = np.array(labels)
    verdict = np.where(scores < ok, "ok", np.where(scores >= max(ng, ok), "ng", "review"))
    rows = {"ok bound (raw)": f"{ok:.6g}", "ng bound (raw)": f"{max(ng, ok):.6g}"}
    for want in ("ok", "ng"):
        for v in ("ok", "review", "ng"):
            rows[f"{want.upper()} labelled -> {v}"] = str(int(((lab == want) & (verdict == v)).sum()))
    flagged = scores >= ok
    rows["NG recall (score >= ok bound)"] = f"{int((flagged & (lab == 'ng')).sum())}/{int((lab == 'ng').sum())}"
    rows["false alarms, labelled OK"] = f"{int((flagged & (lab == 'ok')).sum())}/{int((lab == 'ok').sum())}"
    rows["false alarms, calibration normals"] = f"{int((normals >= ok).sum())}/{normals.size}"
    rows["agreement (model vs operator)"] = f"{int((flagged == (lab == 'ng')).sum())}/{lab.size}"
    return rows


def test_review_loop_end_to_end(loop_store: Path, parts: list[tuple[Path, str, str | None]], demo_root: Path,
                                tmp_path: Path) -> None:
    review_root = tmp_path / "review"
    v1 = Manifest.read(loop_store / CATEGORY / "1").calibration
    srv = start(loop_store, tmp_path / "server.log", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                reviewer_api_keys=f"{REVIEWER}={REVIEWER_KEY}", review_store=str(review_root),
                review_audit_rate=1.0, store_poll_s=0.5, review_scan_s=0.5)
    user = httpx.Client(base_url=srv.url, headers={"X-API-Key": USER_KEY}, timeout=30.0)
    reviewer = httpx.Client(base_url=srv.url, headers={"X-API-Key": REVIEWER_KEY}, timeout=30.0)
    try:
        # 1. a mix of parts: a quarter ok, half review, a quarter ng at version 1's bounds
        n, q = len(parts), len(parts) // 4
        before = inspect_all(user, parts)
        verdicts = {name: r["verdict"] for name, r in before.items()}
        assert list(verdicts.values()).count("review") == n - 2 * q, verdicts
        assert list(verdicts.values()).count("ok") == q and list(verdicts.values()).count("ng") == q
        for r in before.values():
            assert r["verdict"] == v1.verdict(r["raw_score"]) and r["is_anomalous"] == (r["raw_score"] >= r["threshold"])
            assert r["threshold"] == v1.threshold and r["ng_threshold"] == v1.ng_threshold
        png = user.post(f"/v1/inspect/{CATEGORY}", headers={"Accept": "image/png"},
                        files=[upload("again.png", png_variant(parts[0][0], "png-answer"))])
        assert png.headers["x-verdict"] == before[name_of(parts[0][0])]["verdict"]
        assert metric(user, "msflow_verdicts_total", category=CATEGORY, verdict="review") == (
            n - 2 * q + (png.headers["x-verdict"] == "review"))
        # every review verdict is kept, and (audit rate 1) every ok and ng one too; the PNG answer's bytes are new
        wait_for_metric(user, "msflow_review_captures_total", n + 1, timeout=30, category=CATEGORY, outcome="stored")
        wait_for_metric(user, "msflow_review_pending", n + 1, timeout=10, category=CATEGORY)

        # 2. the queue through the API, then label every part (the audit copy of the PNG answer stays pending)
        assert_error(user.get(f"{REVIEW}/items"), 403, "forbidden")  # a user key may inspect, not review
        assert_error(httpx.get(f"{srv.url}{REVIEW}/items"), 401, "missing_api_key")
        page = reviewer.get(f"{REVIEW}/items", params={"verdict": "review"}).json()
        assert {e["item"]["filename"] for e in page["items"]} - {"again.png"} == {
            name for name, v in verdicts.items() if v == "review"}
        assert all(e["item"]["reason"] == "review" for e in page["items"])
        pending, cursor = [], None
        while True:  # every pending item, five at a time
            body = reviewer.get(f"{REVIEW}/items", params={"limit": 5, **({"after": cursor} if cursor else {})}).json()
            pending += body["items"]
            if not (cursor := body["next_cursor"]):
                break
        assert len(pending) == n + 1 and len({e["item"]["id"] for e in pending}) == n + 1
        by_name = {e["item"]["filename"]: e for e in pending if e["item"]["filename"] in before}
        first = by_name[name_of(parts[0][0])]
        assert reviewer.get(first["image_url"]).content == parts[0][0].read_bytes()
        heat = reviewer.get(first["heatmap_url"])
        assert heat.headers["content-type"] == "image/png" and Image.open(io.BytesIO(heat.content)).size == (128, 128)
        assert_error(reviewer.put(f"{REVIEW}/items/{first['item']['id']}/label", json={"label": "maybe"}), 422,
                     "invalid_request")
        assert_error(reviewer.put(f"{REVIEW}/items/20260101T000000000000-ok-0000000001-000000000000/label",
                                  json={"label": "ok"}), 404, "review_item_not_found")
        assert_error(reviewer.put(f"{REVIEW}/items/{first['item']['id']}/label", json={"label": "ok"},
                                  headers={"Sec-Fetch-Site": "cross-site"}), 403, "cross_site_refused")
        truth = label_of(parts)
        for name, entry in by_name.items():
            lab, defect = truth[name]
            r = reviewer.put(f"{REVIEW}/items/{entry['item']['id']}/label",
                             json={"label": lab, **({"defect_type": defect} if defect else {})})
            assert r.status_code == 200, r.text
            assert r.json()["label"]["by"] == REVIEWER and r.json()["label"]["label"] == lab
        labelled_ok = sum(lab == "ok" for lab, _ in truth.values())
        stats = reviewer.get(f"{REVIEW}/stats").json()
        agree = sum(before[n]["is_anomalous"] == (truth[n][0] == "ng") for n in before)
        assert stats["labelled"] == {"ok": labelled_ok, "ng": n - labelled_ok} and stats["agree"] == agree
        fp = sum(before[n]["is_anomalous"] and truth[n][0] == "ok" for n in before)
        fn = sum(not before[n]["is_anomalous"] and truth[n][0] == "ng" for n in before)
        assert stats["disagreements"] == {"1": {"false_positive": fp, "false_negative": fn}}
        assert stats["pending"] == {"review": 0, "ok": 0, "ng": 0, verdicts[name_of(parts[0][0])]: 1}
        def gauges() -> tuple[float, float, float, float]:
            return (metric(user, "msflow_review_labels", category=CATEGORY, label="ok"),
                    metric(user, "msflow_review_labels", category=CATEGORY, label="ng"),
                    metric(user, "msflow_review_disagreements", category=CATEGORY, version="1", kind="false_positive"),
                    metric(user, "msflow_review_disagreements", category=CATEGORY, version="1", kind="false_negative"))
        assert gauges() == (labelled_ok, n - labelled_ok, fp, fn)
        # A relabel replaces the label: the gauges move by one, never count it twice; and back.
        name, entry = next(iter(by_name.items()))
        lab, defect = truth[name]
        flipped = "ng" if lab == "ok" else "ok"
        r = reviewer.put(f"{REVIEW}/items/{entry['item']['id']}/label", json={"label": flipped})
        assert r.status_code == 200 and r.json()["previous"]["label"] == lab, r.text
        was_anomalous = before[name]["is_anomalous"]
        moved = (labelled_ok + (1 if flipped == "ok" else -1), n - labelled_ok + (1 if flipped == "ng" else -1),
                 fp + (1 if was_anomalous and flipped == "ok" else -1 if was_anomalous and lab == "ok" else 0),
                 fn + (1 if not was_anomalous and flipped == "ng" else -1 if not was_anomalous and lab == "ng" else 0))
        assert gauges() == moved
        r = reviewer.put(f"{REVIEW}/items/{entry['item']['id']}/label",
                         json={"label": lab, **({"defect_type": defect} if defect else {})})
        assert r.status_code == 200 and gauges() == (labelled_ok, n - labelled_ok, fp, fn)
        wait_until(lambda: metric(user, "msflow_review_pending", category=CATEGORY) == 1, 10, "one pending left")
        export = reviewer.get(f"{REVIEW}/export")
        assert export.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(export.content)) as z:
            assert len([n for n in z.namelist() if n.startswith("good/")]) == labelled_ok
            assert len(z.read("labels.jsonl").decode().splitlines()) == n

        # 3. msflow recalibrate, as an operator runs it: fewer than 10 labels of each class move
        # the bounds, so it is refused (after the table) until the operator accepts that
        command = [sys.executable, "-m", "msflow.cli", "recalibrate", "--store", str(loop_store),
                   "--category", CATEGORY, "--review-store", str(review_root)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 2 and "--accept-small-sample" in run.stderr, run.stdout + run.stderr
        assert "ng bound (raw)" in run.stdout and not (loop_store / CATEGORY / "2").exists()
        run = subprocess.run([*command, "--accept-small-sample"], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "too small to support this change" in run.stderr  # fewer than 10 NG labels
        v2_dir = loop_store / CATEGORY / "2"
        v2 = Manifest.read(v2_dir)
        v2.verify_files(v2_dir)
        assert v2.recalibrated_from == "1" and v2.calibration.method == "review_labels"
        assert v2.calibration.labels is not None
        assert (v2.calibration.labels.ok, v2.calibration.labels.ng) == (labelled_ok, n - labelled_ok)
        assert os.stat(v2_dir / "model.onnx").st_ino == os.stat(loop_store / CATEGORY / "1" / "model.onnx").st_ino
        assert not (v2_dir / "threshold_override.json").exists()

        # 5. every number of the table, counted here from the served scores and the labels
        names = sorted(before)
        scores = np.array([before[n]["raw_score"] for n in names])
        labels = [truth[n][0] for n in names]
        normals = onnx_scores(loop_store / CATEGORY / "1",
                              [s.path for s in folder_of_good_images(demo_root / CATEGORY / "calibration" / "good")])
        rows = table_rows(run.stdout)
        want_before = expected_rows(labels, scores, normals, v1.threshold, v1.ng_bound)
        want_after = expected_rows(labels, scores, normals, v2.calibration.threshold, v2.calibration.ng_bound)
        assert set(want_before) <= set(rows), run.stdout
        for name in want_before:
            assert rows[name] == (want_before[name], want_after[name]), (name, run.stdout)
        # ... and the new bounds meet the stated goal on these labels
        ng_scores, ok_scores = scores[[lab == "ng" for lab in labels]], scores[[lab == "ok" for lab in labels]]
        goods = np.r_[normals, ok_scores]
        assert v2.calibration.threshold == just_above(goods[goods < ng_scores.min()].max())
        assert v2.calibration.ng_bound == max(ng_scores.min(), just_above(goods.max()), v2.calibration.threshold)

        # 4. the new version is served without a restart, and the labelled parts move as labelled
        wait_until(lambda: user.get(f"/v1/models/{CATEGORY}").json()["version"] == "2", 30, "version 2 served")
        after = inspect_all(user, parts)
        moved = 0
        for name, r in after.items():
            assert r["model_version"] == "2" and r["raw_score"] == pytest.approx(before[name]["raw_score"], abs=1e-5)
            assert r["verdict"] == v2.calibration.verdict(r["raw_score"])
            lab = truth[name][0]
            if lab == "ng":
                assert r["is_anomalous"], (name, r)  # recall of labelled NG: all (99% of < 100 allows no miss)
            if lab == "ok" and r["raw_score"] < ng_scores.min():
                assert r["verdict"] == "ok", (name, r)
            if lab == "ng" and r["raw_score"] > goods.max():
                assert r["verdict"] == "ng", (name, r)
            moved += r["verdict"] != before[name]["verdict"] and r["verdict"] == {"ok": "ok", "ng": "ng"}[lab]
        assert moved >= 1, (before, after)
        assert reviewer.get(f"{REVIEW}/items/{first['item']['id']}").json()["label"]["by"] == REVIEWER
    finally:
        user.close()
        reviewer.close()
        srv.stop()


def test_both_bounds_overridden_at_runtime(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store, ignore=shutil.ignore_patterns(".review"))
    cal = Manifest.read(store / CATEGORY / "1").calibration
    srv = start(store, tmp_path / "server.log", admin_api_keys=ADMIN_KEY, review_enabled=False)
    admin = {"X-API-Key": ADMIN_KEY}
    try:
        path = f"{srv.url}/v1/models/{CATEGORY}/threshold"
        r = httpx.put(path, json={"ng_threshold": cal.ng_bound + 0.01}, headers=admin)
        assert r.status_code == 200, r.text
        body = r.json()  # only the ng bound named: the ok bound stays
        assert body["threshold"] == cal.threshold and body["ng_threshold"] == pytest.approx(cal.ng_bound + 0.01)
        r = httpx.put(path, json={"threshold": cal.threshold - 0.01}, headers=admin).json()
        assert r["ng_threshold"] == pytest.approx(cal.ng_bound + 0.01)  # ... and an ng override stays too
        assert_error(httpx.put(path, json={"threshold": 2.0, "ng_threshold": 1.0, "force": True}, headers=admin),
                     422, "invalid_bounds")
        assert_error(httpx.put(path, json={}, headers=admin), 422, "invalid_request")
        model = httpx.get(f"{srv.url}/v1/models/{CATEGORY}").json()
        assert model["ng_threshold"] == pytest.approx(cal.ng_bound + 0.01)
        assert model["calibrated_ng_threshold"] == cal.ng_bound
    finally:
        srv.stop()


def test_the_ng_bound_is_shared_through_redis(loop_store: Path, tmp_path: Path) -> None:
    """Replicas and workers read the same override record: the ng bound travels with the threshold."""
    from service.config import Settings
    from service.pipeline.thresholds import ThresholdOverrides
    from service.redisq.connection import RedisConnection

    redis_server = RedisServer(tmp_path)
    man = Manifest.read(loop_store / CATEGORY / "1")
    try:
        async def scenario() -> None:
            settings = Settings(model_store=tmp_path / "none", redis_url=redis_server.url, redis_prefix="msflow-ng:")
            a, b = ThresholdOverrides(settings, RedisConnection(settings)), ThresholdOverrides(settings,
                                                                                                RedisConnection(settings))
            assert b.calibration(man).ng_bound == man.calibration.ng_bound
            await a.set(CATEGORY, "1", man.calibration.threshold, ng_threshold=man.calibration.ng_bound + 1.0)
            assert await b.refresh([(CATEGORY, "1")])
            assert b.calibration(man).ng_bound == man.calibration.ng_bound + 1.0
            assert b.calibration(man).verdict(man.calibration.ng_bound + 0.5) == "review"
            await a.clear(CATEGORY, "1")
            await b.refresh([(CATEGORY, "1")])
            assert b.calibration(man).ng_bound == man.calibration.ng_bound

        asyncio.run(scenario())
    finally:
        redis_server.stop()


def test_the_review_store_stays_in_budget_under_a_burst_and_labels_survive_a_restart(
        loop_store: Path, parts: list[tuple[Path, str, str | None]], tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(loop_store, store, ignore=shutil.ignore_patterns("2", ".review"))
    review_root = tmp_path / "review"
    images = [png_variant(parts[i % len(parts)][0], f"burst-{i}") for i in range(24)]
    max_bytes = 3 * (max(len(b) for b in images) + 24_000)  # room for about three items
    settings = dict(api_keys=USER_KEY, reviewer_api_keys=f"{REVIEWER}={REVIEWER_KEY}", review_store=str(review_root),
                    review_audit_rate=1.0, review_max_bytes=max_bytes, review_max_items=5, max_queue_delay_ms=5,
                    review_category_share=1.0)  # the whole store's bound, one category
    srv = start(store, tmp_path / "a.log", **settings)
    try:
        client = httpx.Client(base_url=srv.url, headers={"X-API-Key": USER_KEY}, timeout=60.0)

        def one(i: int) -> int:
            return client.post(f"/v1/inspect/{CATEGORY}?heatmap=none",
                               files=[upload(f"burst-{i}.png", images[i])]).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(len(images))))
        assert codes == [200] * len(images)  # a full review store never fails an inspection
        offered = lambda: sum(metric(client, "msflow_review_captures_total", category=CATEGORY, outcome=o)  # noqa: E731
                              for o in ("stored", "full", "queue_full", "duplicate", "error"))
        wait_until(lambda: offered() == len(images), 30, "every capture accounted for")
        stored = metric(client, "msflow_review_captures_total", category=CATEGORY, outcome="stored")
        assert 1 <= stored <= 5 and metric(client, "msflow_review_captures_total", category=CATEGORY,
                                           outcome="full") >= 1
        on_disk = sum(f.stat().st_size for f in review_root.rglob("*") if f.is_file() and f.name != ".lock")
        assert on_disk <= max_bytes, (on_disk, max_bytes)
        items = list((review_root / CATEGORY / "items").iterdir())
        assert len(items) == stored
        reviewer = {"X-API-Key": REVIEWER_KEY}
        entry = httpx.get(f"{srv.url}{REVIEW}/items", headers=reviewer).json()["items"][0]
        labelled = httpx.put(f"{srv.url}{REVIEW}/items/{entry['item']['id']}/label", headers=reviewer,
                             json={"label": "ng", "defect_type": "scratch", "note": "burst"}).json()["label"]
        client.close()
    finally:
        srv.stop()
    assert sum(f.stat().st_size for f in review_root.rglob("*") if f.is_file() and f.name != ".lock") <= max_bytes
    again = start(store, tmp_path / "b.log", **settings)
    try:
        got = httpx.get(f"{again.url}{REVIEW}/items/{entry['item']['id']}", headers={"X-API-Key": REVIEWER_KEY}).json()
        assert got["label"] == labelled and got["label"]["by"] == REVIEWER and got["label"]["note"] == "burst"
        stats = httpx.get(f"{again.url}{REVIEW}/stats", headers={"X-API-Key": REVIEWER_KEY}).json()
        assert stats["labelled"] == {"ok": 0, "ng": 1} and stats["store_bytes"] <= max_bytes
        plain = httpx.Client(base_url=again.url)
        wait_until(lambda: metric(plain, "msflow_review_pending", category=CATEGORY) == stored - 1, 10,
                   "the pending gauge read from the store after the restart")
        plain.close()
    finally:
        again.stop()


def test_an_item_whose_image_file_is_gone_is_a_404(tmp_path: Path) -> None:
    """A prune killed mid-rmtree, or an expiry racing the read, leaves item.json without its
    image (or heatmap): the reviewer gets 404 review_item_not_found, never a 500."""
    from datetime import datetime, timezone

    from harness import fake_version
    from models.review_store import Budget, ReviewStore

    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    review_root = tmp_path / "review"
    review = ReviewStore(review_root, Budget(10**9, 1000, 7 * 86_400.0, 90 * 86_400.0))
    fields = {"reason": "review", "model_version": "1", "engine": "null", "filename": "a.png", "verdict": "review",
              "is_anomalous": True, "raw_score": 0.7, "score": 0.55, "threshold": 0.5, "ng_threshold": 0.9,
              "regions": []}
    ids = [review.add(CATEGORY, fields, b"image %d" % i, "PNG", (8, 8), b"heat", (8, 8),
                      now=datetime.now(timezone.utc))[1] for i in range(2)]
    (review_root / CATEGORY / "items" / ids[0] / "image.png").unlink()
    (review_root / CATEGORY / "items" / ids[0] / "heatmap.png").unlink()
    srv = start(store, tmp_path / "server.log", engine="null", api_keys=USER_KEY,
                reviewer_api_keys=f"{REVIEWER}={REVIEWER_KEY}", review_store=str(review_root))
    try:
        reviewer = {"X-API-Key": REVIEWER_KEY}
        for name in ("image", "heatmap.png"):
            assert_error(httpx.get(f"{srv.url}{REVIEW}/items/{ids[0]}/{name}", headers=reviewer), 404,
                         "review_item_not_found")
        # nothing to judge: a label would be counted in the stats and left out by recalibrate and train
        assert_error(httpx.put(f"{srv.url}{REVIEW}/items/{ids[0]}/label", headers=reviewer, json={"label": "ok"}),
                     404, "review_item_not_found")
        r = httpx.get(f"{srv.url}{REVIEW}/items/{ids[1]}/image", headers=reviewer)
        assert r.status_code == 200 and r.content == b"image 1"
    finally:
        srv.stop()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
