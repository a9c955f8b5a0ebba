"""End to end: `msflow serve` as a real subprocess on a loopback port, a real exported model,
httpx clients. One main server is shared by the module; tight-limit and shutdown scenarios
start their own small servers."""

from __future__ import annotations

import base64
import io
import os
import random
import shutil
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.data import MVTecCategory
from models.manifest import Manifest

from harness import (ADMIN_KEY, CATEGORY, USER_KEY, Server, absolute, assert_error, client_for, damaged, metric, part,
                     png_of, served, start, wait_for_metric)

# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(module_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's server, on a private copy of the store (module_store): the reload test
    adds a version to it."""
    with served(module_store, tmp_path_factory.mktemp("logs") / "main.log", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                max_batch_size=8, max_queue_delay_ms=15, max_upload_bytes=1_000_000, max_request_bytes=3_000_000,
                max_image_pixels=2_000_000, max_files_per_request=4, max_request_megapixels=20,
                max_inflight_megapixels=40) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with client_for(server, USER_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def demo_files(demo_root: Path) -> dict[str, list[Path]]:
    samples = MVTecCategory(demo_root, CATEGORY).test_samples()
    return {"good": [s.path for s in samples if s.label == 0], "defect": [s.path for s in samples if s.label == 1]}


def test_single_image_json_with_heatmap(client: httpx.Client, demo_files: dict[str, list[Path]]) -> None:
    r = client.post(f"/v1/inspect/{CATEGORY}", files=[part(demo_files["defect"][0])])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["category"] == CATEGORY and body["engine"].startswith("onnxruntime") and body["request_id"]
    assert r.headers["x-request-id"] == body["request_id"]
    (res,) = body["results"]
    model = client.get(f"/v1/models/{CATEGORY}").json()
    assert res["model_version"] == model["version"] and res["threshold"] == model["threshold"]
    assert 0.0 <= res["score"] <= 1.0 and res["is_anomalous"] == (res["raw_score"] >= res["threshold"])
    assert (res["score"] >= 0.5) == res["is_anomalous"]
    assert res["image_size"] == {"width": 128, "height": 128} and res["filename"] == demo_files["defect"][0].name
    assert set(res["timings_ms"]) == {"decode", "queue", "engine", "render", "total"}
    heat = res["heatmap"]
    assert heat["format"] == "png" and heat["encoding"] == "base64"
    img = Image.open(io.BytesIO(base64.b64decode(heat["data"])))
    assert img.format == "PNG" and img.size == (128, 128) == (heat["width"], heat["height"])


def test_multi_image_answers_in_order(client: httpx.Client, demo_files: dict[str, list[Path]]) -> None:
    paths = [demo_files["good"][0], demo_files["defect"][1], demo_files["good"][1]]
    r = client.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "none"}, files=[part(p) for p in paths])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert [x["filename"] for x in results] == [p.name for p in paths]
    assert all(x["heatmap"] is None for x in results)


def test_png_accept_model_and_original_size(client: httpx.Client, demo_files: dict[str, list[Path]]) -> None:
    wide = Image.open(demo_files["defect"][0]).convert("RGB").resize((300, 200))
    raw = png_of(wide, "JPEG")
    headers = {"Accept": "image/png", "Content-Type": "image/jpeg", "Authorization": f"Bearer {USER_KEY}"}
    for size, expected, overlay in (("model", (128, 128), "false"), ("original", (300, 200), "true")):
        r = httpx.post(absolute(client, f"/v1/inspect/{CATEGORY}"), content=raw, headers=headers,
                       params={"heatmap_size": size, "overlay": overlay}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        img.load()
        # a bare heatmap is a palette PNG (the colormap is its palette); an overlay is RGB
        assert img.size == expected and img.mode == ("RGB" if overlay == "true" else "P")
        assert r.headers["x-heatmap-size"] == f"{expected[0]}x{expected[1]}"
        assert 0.0 <= float(r.headers["x-anomaly-score"]) <= 1.0
        assert r.headers["x-is-anomalous"] in ("true", "false") and r.headers["x-model-version"]
    # Several images with Accept: image/png and JSON acceptable -> JSON
    r = client.post(f"/v1/inspect/{CATEGORY}", headers={"Accept": "image/png, application/json;q=0.5"},
                    files=[part(demo_files["good"][0])] * 2)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    r = client.post(f"/v1/inspect/{CATEGORY}", headers={"Accept": "image/png"}, files=[part(demo_files["good"][0])] * 2)
    assert_error(r, 406, "not_acceptable")


def test_defects_score_above_threshold_more_often(client: httpx.Client, demo_files: dict[str, list[Path]]) -> None:
    def flagged(paths: list[Path]) -> tuple[float, float]:
        scores, hits = [], []
        for i in range(0, len(paths), 4):
            r = client.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "none"},
                            files=[part(p) for p in paths[i: i + 4]])
            assert r.status_code == 200, r.text
            scores += [x["score"] for x in r.json()["results"]]
            hits += [x["is_anomalous"] for x in r.json()["results"]]
        return float(np.mean(hits)), float(np.mean(scores))

    good_rate, good_score = flagged(demo_files["good"])
    defect_rate, defect_score = flagged(demo_files["defect"])
    assert defect_rate > good_rate and defect_score > good_score, (good_rate, defect_rate, good_score, defect_score)


def test_concurrent_clients_form_batches(client: httpx.Client, demo_files: dict[str, list[Path]]) -> None:
    batches_before = metric(client, "msflow_batch_size_count", category=CATEGORY)
    singles_before = metric(client, "msflow_batch_size_bucket", category=CATEGORY, le="1.0")
    files = demo_files["good"] + demo_files["defect"]

    def one(i: int) -> dict[str, Any]:
        r = client.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "none"}, files=[part(files[i % len(files)])])
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert max(r["batch_size"] for r in results) > 1
    batches = metric(client, "msflow_batch_size_count", category=CATEGORY) - batches_before
    singles = metric(client, "msflow_batch_size_bucket", category=CATEGORY, le="1.0") - singles_before
    assert 0 < batches < 32 and singles < batches  # some engine calls carried more than one image


def test_models_and_probes(client: httpx.Client) -> None:
    listing = client.get("/v1/models").json()
    assert [m["category"] for m in listing["models"]] == [CATEGORY] and listing["failed"] == {}
    info = client.get(f"/v1/models/{CATEGORY}").json()
    assert info["input_size"] == 128 and info["calibration"]["map_high"] > info["calibration"]["map_low"]
    assert httpx.get(absolute(client, "/healthz")).json() == {"status": "ok"}
    ready = httpx.get(absolute(client, "/readyz"))
    assert ready.status_code == 200 and CATEGORY in ready.json()["models"]


def test_metrics_counters_move(client: httpx.Client, demo_files: dict[str, list[Path]]) -> None:
    labels = {"endpoint": "/v1/inspect/{category}", "category": CATEGORY, "status": "200"}
    before = metric(client, "msflow_requests_total", **labels)
    images_before = metric(client, "msflow_images_total", category=CATEGORY)
    engine_before = metric(client, "msflow_engine_seconds_count", category=CATEGORY)
    r = client.post(f"/v1/inspect/{CATEGORY}", files=[part(demo_files["good"][0])])
    assert r.status_code == 200
    assert metric(client, "msflow_requests_total", **labels) == before + 1
    assert metric(client, "msflow_images_total", category=CATEGORY) == images_before + 1
    assert metric(client, "msflow_engine_seconds_count", category=CATEGORY) >= engine_before + 1
    assert metric(client, "msflow_request_duration_seconds_count", endpoint="/v1/inspect/{category}") > 0
    assert metric(client, "msflow_model_info", category=CATEGORY) == 1
    assert metric(client, "msflow_queue_wait_seconds_count", category=CATEGORY) > 0
    # The collector's passes are timed (the server's requests allocate; each report comes within a second).
    deadline = time.monotonic() + 5
    while metric(client, "msflow_gc_pause_seconds_count", process="api") == 0 and time.monotonic() < deadline:
        client.post(f"/v1/inspect/{CATEGORY}", files=[part(demo_files["good"][0])])
        time.sleep(0.2)
    assert metric(client, "msflow_gc_pause_seconds_count", process="api") > 0


# ---------------------------------------------------------------------- errors
def test_error_codes(client: httpx.Client, server: Server, demo_files: dict[str, list[Path]]) -> None:
    good = demo_files["good"][0]
    url = f"/v1/inspect/{CATEGORY}"
    err = assert_error(client.post("/v1/inspect/metal", files=[part(good)]), 404, "unknown_category")
    assert err["details"]["categories"] == [CATEGORY] and CATEGORY in err["message"]
    assert_error(client.post("/v1/inspect/..%2F..%2Fetc", files=[part(good)]), 404, "not_found")
    assert_error(client.post("/v1/inspect/Bad.Name", files=[part(good)]), 404, "unknown_category")
    assert_error(client.get("/v1/models/nope"), 404, "unknown_category")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get(url), 405, "method_not_allowed")
    assert_error(client.post(url, files=[("file", ("a.txt", b"just text", "text/plain"))]), 415,
                 "unsupported_media_type")
    assert_error(client.post(url, content=b"x", headers={"Content-Type": "text/plain"}), 415,
                 "unsupported_media_type")
    assert_error(client.post(url, files=[("file", ("a.gif", png_of(Image.new("RGB", (9, 9)), "GIF"), "image/gif"))]),
                 415, "unsupported_media_type")
    data = good.read_bytes()
    err = assert_error(client.post(url, files=[part(good), ("file", ("t.png", data[: len(data) // 2], "image/png"))]),
                       422, "undecodable_image")
    assert err["details"]["index"] == 1
    assert_error(client.post(url, params={"heatmap": "sideways"}, files=[part(good)]), 422, "invalid_request")
    assert_error(client.post(url, data={"other": "x"}, files=[("notfile", ("a.png", data, "image/png"))]), 400,
                 "bad_upload")
    # A part named file without a filename (curl -F file=<x.png) is a text field: said so, not "no image".
    no_name = client.post(url, content=b'--zz\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + data
                          + b"\r\n--zz--\r\n", headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert_error(no_name, 400, "bad_upload")
    assert "'file' has no filename" in no_name.json()["error"]["message"], no_name.json()
    # heatmap=url without Redis: a link served from this process's memory (tests/test_redis_store.py has Redis)
    linked = client.post(url, params={"heatmap": "url"}, files=[part(good)])
    assert linked.status_code == 200 and client.get(linked.json()["results"][0]["heatmap"]["url"]).status_code == 200
    # 413: bytes (per image, raw and multipart; whole request), pixels, too many files
    big = os.urandom(1_100_000)
    assert_error(client.post(url, content=big, headers={"Content-Type": "image/png"}), 413, "image_too_large")
    assert_error(client.post(url, files=[("file", ("big.png", big, "image/png"))]), 413, "image_too_large")
    assert_error(client.post(url, files=[("file", (f"{i}.png", big[:900_000], "image/png")) for i in range(4)]),
                 413, "request_too_large")
    bomb = png_of(Image.new("L", (1, 1)))
    ihdr = bomb.index(b"IHDR")  # same file, header patched to claim 50000 x 50000 pixels
    fields = struct.pack(">II", 50_000, 50_000) + bomb[ihdr + 12: ihdr + 17]
    bomb = bomb[: ihdr + 4] + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields) & 0xFFFFFFFF) + bomb[ihdr + 21:]
    assert_error(client.post(url, content=bomb, headers={"Content-Type": "image/png"}), 413, "image_too_large")
    assert_error(client.post(url, files=[part(good)] * 5), 413, "too_many_files")
    # 413 by decoded pixels, from the headers: four 1400 x 1400 grey PNGs (a few KB each) hold
    # 4 x 5.9 MP with their original-size overlays (decode, background, heatmap), over this
    # server's 20 MP per request; without the overlays they fit
    grey = png_of(Image.new("L", (1400, 1400), 128))
    assert len(grey) < 20_000
    err = assert_error(client.post(url, params={"heatmap_size": "original", "overlay": "true"},
                                   files=[("file", (f"g{i}.png", grey, "image/png")) for i in range(4)]),
                       413, "too_many_pixels")
    assert err["details"]["limit_megapixels"] == 20.0 and err["details"]["megapixels"] > 20
    fits = client.post(url, params={"heatmap": "none"}, files=[("file", (f"g{i}.png", grey, "image/png"))
                                                                for i in range(4)])
    assert fits.status_code == 200, fits.text
    # 401 / 403
    anon = httpx.post(f"{server.url}{url}", files=[part(good)])
    assert_error(anon, 401, "missing_api_key")
    assert anon.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.post(f"{server.url}{url}", files=[part(good)], headers={"X-API-Key": "wrong"}), 401,
                 "invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401,
                 "invalid_api_key")
    assert_error(client.post(f"/v1/models/{CATEGORY}/reload"), 403, "forbidden")
    # still alive and serving after all that
    assert client.post(url, files=[part(good)]).status_code == 200


# Framing a broken client or a hand-written one gets wrong, inserted at random
_FRAMING = (b"\r\n", b"--", b"\r\n\r\n", b";", b'"', b"\x00", b"=", b"filename*=UTF-8''%FF%FE",
            b"Content-Type: image/png\r\n")


def _hostile_request(rng: random.Random, images: list[bytes]) -> tuple[dict[str, str], dict[str, str], bytes]:
    """One request as a broken client or an attacker might send it (query, headers, body):
    odd boundaries, part names, filenames and content types, a part count over the limit,
    images damaged, the multipart framing damaged, or a raw body that is not what it says."""
    boundary = rng.choice([b"b0undary", b"----WebKitFormBoundary7MA4YWxkTrZu0gW", b"x" * 70, b"x" * 200, b"", b'b"q'])
    body = b""
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3, 9])):
        data = rng.choice(images)
        if rng.random() < 0.3:
            data = damaged(data, rng, edits=rng.randint(1, 4), longest=64)
        name = rng.choice([b"file", b"files", b"file", b"other", b"FILE", b""])
        filename = rng.choice([None, b"a.png", b"", "\u00e9\u2713".encode(), b"a" * 300, b"../../etc/passwd",
                               b"x\x00y", b'"q"'])
        kind = rng.choice([b"image/png", b"image/jpeg", None, b"text/plain", b"\xff"])
        body += (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name + b'"'
                 + (b'; filename="' + filename + b'"' if filename is not None else b"") + b"\r\n"
                 + (b"Content-Type: " + kind + b"\r\n" if kind is not None else b"") + b"\r\n" + data + b"\r\n")
    body += b"--" + boundary + b"--\r\n"
    content_type = b"multipart/form-data; boundary=" + boundary
    roll = rng.random()
    if roll < 0.3:
        body = damaged(body, rng, edits=rng.randint(1, 6), longest=64)
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(body) + 1)
            body = body[:at] + rng.choice(_FRAMING) + body[at:]
    elif roll > 0.85:
        content_type = rng.choice([b"image/png", b"application/octet-stream", b"multipart/form-data", b"text/plain",
                                   b"multipart/form-data; boundary=", b"multipart/mixed; boundary=b0undary",
                                   b'multipart/form-data; boundary="' + boundary + b'"; charset=utf-16'])
        if roll > 0.93:
            body = damaged(rng.choice(images), rng, edits=rng.randint(1, 4), longest=64)
    headers = {"Content-Type": content_type.decode("latin-1")}
    if rng.random() < 0.2:
        headers["Accept"] = rng.choice(["image/png", "image/png;q=0.5, application/json", "*/*", "image/*;q=x",
                                        "application/json;q=0"])
    query: dict[str, str] = {}
    for key, values in (("heatmap", ["inline", "none", "url", "bogus", ""]),
                        ("overlay", ["false", "true", "1", "maybe"]), ("heatmap_size", ["model", "original", "x"])):
        if rng.random() < 0.5:
            query[key] = values[0] if rng.random() < 0.8 else rng.choice(values)
    return query, headers, body


def test_damaged_requests_get_a_clear_error_and_the_server_lives(client: httpx.Client,
                                                                  demo_files: dict[str, list[Path]]) -> None:
    """Seeded random requests, built and damaged as broken clients and attackers make them
    (:func:`_hostile_request`): each is answered, with results or with the API's error body
    and a 4xx; none with a 5xx or a dropped connection, and the server serves afterwards.
    ``MSFLOW_TEST_HOSTILE_REQUESTS`` runs more of them (docs/DESIGN.md, "Service contract": 20,000)."""
    png = demo_files["defect"][0].read_bytes()
    images = [png, png_of(Image.open(io.BytesIO(png)).convert("RGB"), "JPEG", quality=90)]
    rng = random.Random(20261206)
    seen: dict[int, int] = {}
    for _ in range(int(os.environ.get("MSFLOW_TEST_HOSTILE_REQUESTS", "400"))):
        query, headers, body = _hostile_request(rng, images)
        r = client.post(f"/v1/inspect/{CATEGORY}", params=query, headers=headers, content=body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code in {200, 400, 406, 413, 415, 422}, (r.status_code, r.text, query, headers, body[:200])
        if r.status_code != 200:
            error = r.json()
            assert set(error) == {"error"} and error["error"]["code"] and error["error"]["message"], error
        elif r.headers["content-type"] == "image/png":
            assert r.content.startswith(b"\x89PNG") and r.headers["x-is-anomalous"] in ("true", "false")
        else:
            results = r.json()["results"]
            assert results and all(x["verdict"] in ("ok", "review", "ng") for x in results), results
    # the generator reached the parser's, the limits' and the decoder's refusals, and the engine
    assert {200, 400, 413, 415, 422} <= set(seen), seen
    print(f"answers by status: {dict(sorted(seen.items()))}")
    assert client.post(f"/v1/inspect/{CATEGORY}", files=[part(demo_files["good"][0])]).status_code == 200


# ---------------------------------------------------------------------- reload
def test_reload_under_load_without_failures(client: httpx.Client, module_store: Path,
                                            demo_files: dict[str, list[Path]]) -> None:
    src = module_store / CATEGORY / "1"
    dst = module_store / CATEGORY / "2"
    shutil.copytree(src, dst)
    Manifest.read(dst).model_copy(update={"version": "2"}).write(dst)
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            r = client.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "none"},
                            files=[part(demo_files["good"][0]), part(demo_files["defect"][0])])
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.extend(x["model_version"] for x in r.json()["results"])

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.3)
        r = client.post(f"/v1/models/{CATEGORY}/reload", headers={"X-API-Key": ADMIN_KEY})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "2"
        time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert statuses and set(statuses) == {200}, statuses
    assert "1" in versions and versions[-1] == "2"
    assert client.get(f"/v1/models/{CATEGORY}").json()["version"] == "2"
    assert metric(client, "msflow_model_info", category=CATEGORY, version="2") == 1
    assert metric(client, "msflow_model_info", category=CATEGORY, version="1") == 0
    # rolling back to a named version works too; an unknown one fails and keeps serving
    r = client.post(f"/v1/models/{CATEGORY}/reload", params={"version": "1"}, headers={"X-API-Key": ADMIN_KEY})
    assert r.status_code == 200 and r.json()["version"] == "1"
    r = client.post(f"/v1/models/{CATEGORY}/reload", params={"version": "9"}, headers={"X-API-Key": ADMIN_KEY})
    assert_error(r, 404, "version_not_found")
    assert client.get(f"/v1/models/{CATEGORY}").json()["version"] == "1"


# ---------------------------------------------------------------------- overload, deadline, shutdown
def test_queue_full_503_and_deadline_504(model_store: Path, tmp_path: Path,
                                         demo_files: dict[str, list[Path]]) -> None:
    # A lone request waits 1.5 s for company but its deadline is 0.8 s -> 504; meanwhile its
    # three images fill a queue of four, so a second three-image request gets 503 at once.
    # (Batches of 8 can never fill from a queue of 4, so nothing leaves before the delay.)
    srv = start(model_store, tmp_path / "tight.log", max_batch_size=8, max_queue_delay_ms=1500, max_queue_size=4,
                request_deadline_ms=800, retry_after_s=2, max_files_per_request=4)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
            files = [part(p) for p in demo_files["good"][:3]]
            first = pool.submit(c.post, f"/v1/inspect/{CATEGORY}", files=files)
            wait_for_metric(c, "msflow_queue_depth", 3, category=CATEGORY)
            r = c.post(f"/v1/inspect/{CATEGORY}", files=files)
            assert_error(r, 503, "queue_full")
            assert r.headers["retry-after"] == "2"
            # a client that gives up (timeout, disconnect): its image is dropped too
            impatient = pool.submit(c.post, f"/v1/inspect/{CATEGORY}", files=[part(demo_files["good"][0])],
                                    timeout=0.6)
            wait_for_metric(c, "msflow_queue_depth", 4, category=CATEGORY)
            with pytest.raises(httpx.TimeoutException):
                impatient.result()
            assert_error(first.result(), 504, "deadline_exceeded")
            # every abandoned image was dropped before the engine (it has run no batch at all)
            wait_for_metric(c, "msflow_rejections_total", 4, category=CATEGORY, reason="cancelled")
            assert metric(c, "msflow_batch_size_count", category=CATEGORY) == 0
            wait_for_metric(c, "msflow_requests_total", 1, category=CATEGORY, status="499")
            assert httpx.get(f"{srv.url}/readyz").status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM)], ids=["sigterm", "ctrl-c"])
def test_graceful_shutdown_finishes_in_flight_requests(model_store: Path, tmp_path: Path,
                                                       demo_files: dict[str, list[Path]],
                                                       signals: tuple[signal.Signals, ...]) -> None:
    """Ctrl-C reaches every process of the group, and the supervisor then sends SIGTERM: the
    delay's timer exited through uvicorn's handle_exit with the SIGINT, which forced the exit
    and cut the requests in flight."""
    srv = start(model_store, tmp_path / "shutdown.log", max_batch_size=16, max_queue_delay_ms=2500,
                shutdown_delay_s=0.5, graceful_shutdown_s=20)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(c.post, f"/v1/inspect/{CATEGORY}", files=[part(p)])
                       for p in demo_files["defect"][:6]]
            wait_for_metric(c, "msflow_queue_depth", 6, category=CATEGORY)  # all six are waiting
            for sig in signals:
                srv.proc.send_signal(sig)
            time.sleep(0.1)
            if len(signals) == 1:  # a second signal ends the delay: the port closes at once
                assert_error(httpx.get(f"{srv.url}/readyz"), 503, "shutting_down")  # during shutdown_delay_s
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        assert all(len(r.json()["results"]) == 1 for r in responses)
        # uvicorn re-raises the SIGTERM after its graceful shutdown (the conventional exit status)
        assert srv.proc.wait(20) in (0, -signal.SIGTERM, -signals[0]), srv.log()
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
