"""The threshold routes of the real ``msflow serve`` of ``served_model_fixtures``: changing
the threshold needs an admin key, an override flips a verdict, survives a restart and is
undone by DELETE; the recent scores say what a candidate threshold would have decided, and
the drift metrics count what was inspected."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, assert_error, metric, start, store_copy
from models.manifest import Manifest
from served_model_fixtures import INSPECT, RATE_WINDOW, inspect
from served_model_fixtures import client, samples, server  # noqa: F401  (fixtures)
from service.pipeline.thresholds import OVERRIDE_FILE

THRESHOLD = f"/v1/models/{CATEGORY}/threshold"
ADMIN = {"X-API-Key": ADMIN_KEY}


def test_threshold_routes_need_an_admin_key(client: httpx.Client, server: Server) -> None:
    assert_error(client.put(THRESHOLD, json={"threshold": 1.0}), 403, "forbidden")
    assert_error(client.delete(THRESHOLD), 403, "forbidden")
    assert_error(client.get(f"/v1/models/{CATEGORY}/recent"), 403, "forbidden")
    assert_error(httpx.put(f"{server.url}{THRESHOLD}", json={"threshold": 1.0}), 401, "missing_api_key")
    assert_error(httpx.put(f"{server.url}{THRESHOLD}", json={"threshold": 1.0}, headers={"X-API-Key": "nope"}), 401,
                 "invalid_api_key")
    admin = {"X-API-Key": ADMIN_KEY}
    assert_error(client.put(THRESHOLD, json={"normalised": 0.4}, headers=admin), 422, "invalid_request")
    assert_error(client.put(THRESHOLD, content=b'{"threshold": NaN}', headers={**admin, "Content-Type":
                                                                              "application/json"}), 422,
                 "invalid_request")
    # A value of the wrong type is refused, not coerced: `true` was a threshold of 1.0 and
    # "force": "no" a force (pydantic's lax mode), so a client's bug could move the verdict.
    for body in ({"threshold": True}, {"threshold": "1.0"}, {"threshold": 1.0, "force": "no"},
                 {"threshold": 1.0, "force": 1}):
        assert_error(client.put(THRESHOLD, json=body, headers=admin), 422, "invalid_request")
    assert_error(client.put("/v1/models/metal/threshold", json={"threshold": 1.0}, headers=admin), 404,
                 "unknown_category")
    # reading the thresholds needs only a key
    state = client.get(THRESHOLD).json()
    assert state["override"] is None and state["threshold"] == state["calibrated_threshold"]


def test_the_ng_bound_alone_goes_back_to_the_manifest_s(client: httpx.Client) -> None:
    """``"ng_threshold": null`` ends an NG override and keeps the ok bound. There was no way to
    say it: null read as "left out" (a body of it alone was 422), and the console's "Reset NG
    bound" sent the calibrated NG bound, refused as inverted (422 invalid_bounds) whenever the
    ok bound had been moved above it, as a line that tolerates more does."""
    info = client.get(f"/v1/models/{CATEGORY}").json()
    span = info["calibration"]["score_max"] - info["calibration"]["score_min"]
    ok = info["calibrated_ng_threshold"] + 0.2 * span
    try:
        r = client.put(THRESHOLD, json={"threshold": ok, "ng_threshold": ok + 0.1 * span, "force": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["ng_threshold"] == pytest.approx(ok + 0.1 * span), r.text
        r = client.put(THRESHOLD, json={"ng_threshold": None}, headers=ADMIN)
        assert r.status_code == 200, r.text
        state = r.json()
        assert state["override"]["ng_threshold"] is None and state["threshold"] == pytest.approx(ok)
        # the manifest's NG bound, which is below the ok bound: no review band above it
        assert state["ng_threshold"] == pytest.approx(ok)
        # left out, an NG override stays (as before)
        client.put(THRESHOLD, json={"ng_threshold": ok + 0.3 * span, "force": True}, headers=ADMIN)
        state = client.put(THRESHOLD, json={"threshold": ok}, headers=ADMIN).json()
        assert state["ng_threshold"] == pytest.approx(ok + 0.3 * span), state
        assert_error(client.put(THRESHOLD, json={"threshold": None}, headers=ADMIN), 422, "invalid_request")
    finally:
        assert client.delete(THRESHOLD, headers=ADMIN).status_code == 200


def test_threshold_override_round_trip_survives_restart(model_store: Path, tmp_path: Path,
                                                        samples: dict[str, list[Path]]) -> None:
    store = store_copy(model_store, tmp_path)
    version_dir = store / CATEGORY / "1"
    image = samples["hole"][0]
    settings = dict(api_keys=USER_KEY, admin_api_keys=ADMIN_KEY)
    srv = start(store, tmp_path / "a.log", **settings)
    try:
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": USER_KEY}, timeout=60) as c:
            info = c.get(f"/v1/models/{CATEGORY}").json()
            calibrated = info["calibrated_threshold"]
            assert info["threshold"] == calibrated and info["threshold_override"] is None
            (before,) = inspect(c, [image])
            assert before["threshold"] == calibrated
            raw = before["raw_score"]
            # a threshold just on the other side of this image's raw score flips its verdict
            span = info["calibration"]["score_max"] - info["calibration"]["score_min"]
            new = raw + 1e-3 * span if before["is_anomalous"] else raw - 1e-3 * span
            # At one defect's score: beyond the sane range (three recent images must reach it), forced.
            assert_error(c.put(THRESHOLD, json={"threshold": new}, headers=ADMIN), 422, "threshold_out_of_range")
            r = c.put(THRESHOLD, json={"threshold": new, "force": True}, headers=ADMIN)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["threshold"] == new and body["calibrated_threshold"] == calibrated
            assert body["override"]["threshold"] == new and body["override"]["version"] == "1"
            assert body["persisted"] == ["file"]
            assert (version_dir / OVERRIDE_FILE).is_file()
            Manifest.read(version_dir).verify_files(version_dir)  # manifest untouched, sha256s valid
            info = c.get(f"/v1/models/{CATEGORY}").json()
            assert info["threshold"] == new and info["calibrated_threshold"] == calibrated
            assert info["threshold_override"]["threshold"] == new
            assert c.get(THRESHOLD).json()["threshold"] == new
            (after,) = inspect(c, [image])
            assert after["threshold"] == new and after["is_anomalous"] != before["is_anomalous"]
            assert after["raw_score"] == pytest.approx(raw, rel=1e-5)
            assert (after["score"] >= 0.5) == after["is_anomalous"]
            assert after["score"] == pytest.approx(min(max((raw - new) / span + 0.5, 0.0), 1.0), abs=1e-5)
            assert after["regions"] == before["regions"]  # the pixel threshold is not the image threshold
            # the PNG answer carries the effective threshold too
            png = c.post(INSPECT, content=image.read_bytes(), headers={"Accept": "image/png",
                                                                         "Content-Type": "image/png"})
            assert float(png.headers["x-threshold"]) == pytest.approx(new, rel=1e-5)
    finally:
        srv.stop()

    srv = start(store, tmp_path / "b.log", **settings)  # a restart keeps the override ...
    try:
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": USER_KEY}, timeout=60) as c:
            info = c.get(f"/v1/models/{CATEGORY}").json()
            assert info["threshold"] == new and info["threshold_override"]["threshold"] == new
            (again,) = inspect(c, [image])
            assert again["threshold"] == new and again["is_anomalous"] == after["is_anomalous"]
            r = c.delete(THRESHOLD, headers=ADMIN)  # ... and DELETE goes back to the calibrated value
            assert r.status_code == 200, r.text
            assert r.json()["override"] is None and r.json()["threshold"] == calibrated
            assert not (version_dir / OVERRIDE_FILE).exists()
            info = c.get(f"/v1/models/{CATEGORY}").json()
            assert info["threshold"] == calibrated and info["threshold_override"] is None
            (restored,) = inspect(c, [image])
            assert restored["threshold"] == calibrated and restored["is_anomalous"] == before["is_anomalous"]
    finally:
        srv.stop()


def test_recent_scores_and_drift_metrics(client: httpx.Client, samples: dict[str, list[Path]]) -> None:
    count_before = metric(client, "msflow_score_count", category=CATEGORY)
    paths = samples["good"][:4] + samples["hole"][:2]
    results = inspect(client, paths)
    assert metric(client, "msflow_score_count", category=CATEGORY) == count_before + len(paths)
    assert metric(client, "msflow_score_bucket", category=CATEGORY, le="1.0") >= len(paths)
    # the anomaly-rate gauge covers exactly the last RATE_WINDOW images
    last = results[-RATE_WINDOW:]
    assert metric(client, "msflow_anomaly_rate", category=CATEGORY) == pytest.approx(
        sum(r["is_anomalous"] for r in last) / RATE_WINDOW)

    model = client.get(f"/v1/models/{CATEGORY}").json()
    candidate = float(np.median([r["raw_score"] for r in results]))
    r = client.get(f"/v1/models/{CATEGORY}/recent", params={"threshold": candidate, "limit": len(paths)},
                   headers=ADMIN)
    assert r.status_code == 200, r.text
    recent = r.json()
    assert recent["version"] == model["version"] and recent["threshold"] == model["threshold"]
    assert [s["filename"] for s in recent["scores"]] == [p.name for p in reversed(paths)]  # newest first
    assert [s["raw_score"] for s in recent["scores"]] == [x["raw_score"] for x in reversed(results)]
    assert all(s["would_be_anomalous"] == (s["raw_score"] >= candidate) for s in recent["scores"])
    summary = recent["summary"]
    everything = client.get(f"/v1/models/{CATEGORY}/recent", params={"limit": 100000}, headers=ADMIN).json()
    raws = [s["raw_score"] for s in everything["scores"] if s["model_version"] == model["version"]]
    assert summary["images"] == len(raws)
    assert summary["anomalous"] == sum(x >= candidate for x in raws)
    assert summary["anomalous_now"] == sum(x >= model["threshold"] for x in raws)
    assert summary["changed"] == sum((x >= candidate) != (x >= model["threshold"]) for x in raws)
