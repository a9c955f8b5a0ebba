"""Admin routes fail closed, state-changing routes refuse cross-site browsers and bodies over
their budget, internal error text stays in the log, /docs loads nothing from elsewhere, and a
broken category is skipped while the others serve."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.api.body_limits import JSON_BODY_BYTES

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, assert_error, png_of, start

RELOAD = f"/v1/models/{CATEGORY}/reload"
THRESHOLD = f"/v1/models/{CATEGORY}/threshold"


@pytest.fixture(scope="module")
def open_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No keys at all: the default of a fresh `msflow serve`."""
    store = tmp_path_factory.mktemp("open") / "store"
    shutil.copytree(model_store, store)
    srv = start(store, tmp_path_factory.mktemp("logs") / "open.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def dev_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No keys, admin opened by the development switch (what scripts/demo.sh runs)."""
    store = tmp_path_factory.mktemp("dev") / "store"
    shutil.copytree(model_store, store)
    srv = start(store, tmp_path_factory.mktemp("logs") / "dev.log", dev_open_admin=True)
    yield srv
    srv.stop()


def test_admin_routes_are_closed_without_an_admin_key(open_server: Server) -> None:
    url = open_server.url
    for r in (httpx.post(url + RELOAD, headers={"X-Requested-With": "t"}),
              httpx.put(url + THRESHOLD, json={"threshold": 1e30}),
              httpx.delete(url + THRESHOLD, headers={"X-Requested-With": "t"}),
              httpx.get(url + f"/v1/models/{CATEGORY}/recent")):
        error = assert_error(r, 403, "admin_disabled")
        assert "MSFLOW_ADMIN_API_KEYS" in error["message"]
    # inspection itself stays open on an open server
    assert httpx.get(url + f"/v1/models/{CATEGORY}").status_code == 200


def test_bodies_over_their_budget_are_refused_before_they_are_read(open_server: Server, dev_server: Server) -> None:
    """A route with a JSON body takes JSON_BODY_BYTES (service/api/body_limits.py): FastAPI read
    and parsed a whole body before the key check, so a 100 MB body to a route that was going to
    answer 403 held 232 MB of the server first. The image routes keep their own, larger budget."""
    url = open_server.url
    label = f"/v1/review/{CATEGORY}/items/x/label"
    for path in (THRESHOLD, label):
        # declared too large: refused from the headers, before a byte of the body is read
        with socket.create_connection(("127.0.0.1", open_server.port), timeout=10) as sock:
            sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {100 << 20}\r\n\r\n".encode() + b'{"threshold": ')
            answer = b""
            while not answer.endswith(b"}}") and (chunk := sock.recv(65536)):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert json.loads(body)["error"]["code"] == "request_too_large"
        # no length declared (chunked): the key is checked before a byte is read (closed: no keys here)
        assert httpx.put(url + path, content=_over_budget(), headers={"Content-Type": "application/json"}).status_code \
            == 403
        assert httpx.put(url + path, json={"threshold": 1.0, "label": "ok"}).status_code == 403
    # where the key check passes (the development switch opens admin): counted as it is read,
    # refused at the budget
    assert_error(httpx.put(dev_server.url + THRESHOLD, content=_over_budget(),
                           headers={"Content-Type": "application/json"}), 413, "request_too_large")
    # an image upload larger than a JSON body's budget is the upload routes' own business
    noise = png_of(Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)))
    assert len(noise) > JSON_BODY_BYTES
    r = httpx.post(url + f"/v1/inspect/{CATEGORY}", files=[("file", ("n.png", noise, "image/png"))], timeout=30)
    assert r.status_code == 200, r.text


def _over_budget() -> Iterator[bytes]:
    """A JSON body one note longer than JSON_BODY_BYTES, streamed (no Content-Length)."""
    yield b'{"note": "' + b"a" * JSON_BODY_BYTES + b'"}'


def test_the_development_switch_opens_admin_but_not_to_other_sites(dev_server: Server) -> None:
    url = dev_server.url
    threshold = httpx.get(url + THRESHOLD).json()["calibrated_threshold"]
    # what a page on another site can make a browser send: a form post, no custom header
    assert_error(httpx.post(url + RELOAD), 403, "cross_site_refused")
    assert_error(httpx.post(url + RELOAD, headers={"Content-Type": "application/x-www-form-urlencoded"},
                            content=b"x=1"), 403, "cross_site_refused")
    assert_error(httpx.put(url + THRESHOLD, json={"threshold": threshold}, headers={"Sec-Fetch-Site": "cross-site"}),
                 403, "cross_site_refused")
    assert_error(httpx.put(url + THRESHOLD, json={"threshold": threshold}, headers={"Origin": "null"}),
                 403, "cross_site_refused")
    assert httpx.get(url + THRESHOLD).json()["override"] is None  # nothing changed
    # the console (same origin, JSON body or X-Requested-With) and scripts get through
    r = httpx.put(url + THRESHOLD, json={"threshold": threshold}, headers={"Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200, r.text
    # a threshold that would pass every defect needs "force"
    error = assert_error(httpx.put(url + THRESHOLD, json={"threshold": 1e30}), 422, "threshold_out_of_range")
    assert error["details"]["sane_min"] < threshold < error["details"]["sane_max"]
    r = httpx.put(url + THRESHOLD, json={"threshold": 1e30, "force": True})
    assert r.status_code == 200 and r.json()["threshold"] == 1e30, r.text
    r = httpx.delete(url + THRESHOLD, headers={"X-Requested-With": "msflow-console"})
    assert r.status_code == 200 and r.json()["override"] is None, r.text
    r = httpx.post(url + RELOAD, headers={"X-Requested-With": "script"}, timeout=60)
    assert r.status_code == 200, r.text


def test_the_development_switch_answers_only_loopback_names(dev_server: Server) -> None:
    """DNS rebinding: another site's name made to resolve to 127.0.0.1 is, to the browser, that
    site's own origin (Sec-Fetch-Site: same-origin, any header, a JSON body), so its page
    reached the admin and review routes the switch opens, keyless: a threshold moved to 1e30
    (200 before). Where the switch opens them the Host must be a loopback name or address."""
    url, port = dev_server.url, dev_server.port
    rebound = {"Host": f"rebound.example:{port}", "Origin": f"http://rebound.example:{port}",
               "Sec-Fetch-Site": "same-origin", "X-Requested-With": "x"}
    for r in (httpx.put(url + THRESHOLD, json={"threshold": 1e30, "force": True}, headers=rebound),
              httpx.get(url + f"/v1/models/{CATEGORY}/recent", headers=rebound),
              httpx.get(url + f"/v1/review/{CATEGORY}/items", headers=rebound),
              httpx.put(url + f"/v1/review/{CATEGORY}/items/x/label", json={"label": "ok"}, headers=rebound)):
        assert_error(r, 403, "host_refused")
    assert httpx.get(url + THRESHOLD).json()["override"] is None  # nothing changed
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "app.localhost"):
        r = httpx.get(url + f"/v1/models/{CATEGORY}/recent", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)


def test_jobs_refuse_cross_site_browsers(open_server: Server, demo_root: Path) -> None:
    image = next((demo_root / CATEGORY / "test" / "good").glob("*.png"))
    r = httpx.post(open_server.url + f"/v1/jobs/{CATEGORY}", headers={"Sec-Fetch-Site": "cross-site"},
                   files=[("file", (image.name, image.read_bytes(), "image/png"))])
    assert_error(r, 403, "cross_site_refused")


def test_inspection_refuses_cross_site_browsers_too(open_server: Server, demo_root: Path) -> None:
    """An answer feeds the review store, recent scores and drift metrics: on a server without
    keys another site's page posted images (and filenames) into the reviewers' queue."""
    image = next((demo_root / CATEGORY / "test" / "good").glob("*.png"))
    r = httpx.post(open_server.url + f"/v1/inspect/{CATEGORY}", headers={"Sec-Fetch-Site": "cross-site"},
                   files=[("file", (image.name, image.read_bytes(), "image/png"))])
    assert_error(r, 403, "cross_site_refused")
    r = httpx.post(open_server.url + f"/v1/inspect/{CATEGORY}", headers={"Sec-Fetch-Site": "same-origin"},
                   files=[("file", (image.name, image.read_bytes(), "image/png"))])
    assert r.status_code == 200, r.text


def test_no_page_of_this_origin_can_be_framed_and_keyed_answers_stay_out_of_caches(open_server: Server) -> None:
    """The console's file was served again under /static without its page's headers, and so
    were /docs and Swagger's demo page under /docs-assets: framed by another site, the
    console's admin buttons could be clicked through (reproduced on a loopback server)."""
    for path in ("/", "/docs", "/static/console.js", "/docs-assets/swagger-ui.css", "/healthz", "/v1/models"):
        r = httpx.get(open_server.url + path)
        assert r.status_code == 200, (path, r.status_code)
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", path
    for path in ("/static/index.html", "/docs-assets/index.html", "/docs-assets/swagger-initializer.js"):
        assert httpx.get(open_server.url + path).status_code == 404, path
    assert httpx.get(open_server.url + "/v1/models").headers["cache-control"] == "no-store"
    assert "no-store" not in httpx.get(open_server.url + "/static/console.js").headers.get("cache-control", "")


def test_docs_load_no_asset_from_elsewhere(open_server: Server) -> None:
    page = httpx.get(open_server.url + "/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls
    for u in urls:
        assert httpx.get(open_server.url + u).status_code == 200, u
    assert "swagger-ui" in httpx.get(open_server.url + "/docs-assets/swagger-ui-bundle.js").text[:5000].lower()


def test_a_broken_category_is_skipped_while_the_others_serve(model_store: Path, tmp_path: Path,
                                                             demo_root: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    broken = store / "gravel" / "1"
    shutil.copytree(model_store / CATEGORY / "1", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["category"] = "gravel"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    srv = start(store, tmp_path / "server.log", store_poll_s=0)
    try:
        ready = httpx.get(srv.url + "/readyz").json()
        assert ready["models"] == {CATEGORY: "1"}
        assert ready["categories"] == {CATEGORY: "serving 1", "gravel": "failed"}
        assert ready["failed"]["gravel"] and str(store) not in ready["failed"]["gravel"], ready
        image = next((demo_root / CATEGORY / "test" / "good").glob("*.png"))
        files = [("file", (image.name, image.read_bytes(), "image/png"))]
        assert httpx.post(srv.url + f"/v1/inspect/{CATEGORY}", files=files, timeout=30).status_code == 200
        assert_error(httpx.post(srv.url + "/v1/inspect/gravel", files=files, timeout=30), 503, "model_not_loaded")
    finally:
        srv.stop()


def _server_and_a_second_version(model_store: Path, tmp_path: Path) -> tuple[Path, Server, Path]:
    """A copy of the store served (not watched, admin key set) and its version 2, a copy of 1
    for the test to break before it asks for a reload."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    srv = start(store, tmp_path / "server.log", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY, store_poll_s=0)
    v2 = store / CATEGORY / "2"
    shutil.copytree(store / CATEGORY / "1", v2)
    return store, srv, v2


def test_internal_error_text_stays_in_the_log(model_store: Path, tmp_path: Path) -> None:
    """A failed reload says why without the server's paths."""
    store, srv, v2 = _server_and_a_second_version(model_store, tmp_path)
    try:
        manifest = json.loads((v2 / "manifest.json").read_text())
        manifest["version"] = "2"
        (v2 / "manifest.json").write_text(json.dumps(manifest))
        (v2 / "model.onnx").write_bytes(b"garbage")
        r = httpx.post(srv.url + RELOAD, headers={"X-API-Key": ADMIN_KEY}, timeout=60)
        error = assert_error(r, 422, "reload_failed")
        assert str(store) not in error["message"] and "<store>/brick/2/model.onnx" in error["message"], error
        assert httpx.get(srv.url + "/readyz").json()["models"] == {CATEGORY: "1"}  # the old version serves
    finally:
        srv.stop()


def test_a_version_whose_engine_cannot_load_is_a_422(model_store: Path, tmp_path: Path) -> None:
    """The manifest checks pass but onnxruntime refuses the graph (EngineError): the version
    is unusable, not the server broken, so the admin gets the reason with a 422 (was a 500)."""
    from models.manifest import Manifest, file_entry

    store, srv, v2 = _server_and_a_second_version(model_store, tmp_path)
    try:
        (v2 / "model.onnx").write_bytes(b"not an onnx graph" * 10)
        manifest = Manifest.read(v2)
        manifest.model_copy(update={"version": "2", "files": {**manifest.files,
                                                              "model.onnx": file_entry(v2 / "model.onnx")}}).write(v2)
        r = httpx.post(srv.url + RELOAD, headers={"X-API-Key": ADMIN_KEY}, timeout=60)
        error = assert_error(r, 422, "reload_failed")
        assert "cannot load <store>/brick/2/model.onnx" in error["message"] and str(store) not in error["message"]
        assert httpx.get(srv.url + "/readyz").json()["models"] == {CATEGORY: "1"}  # the old version serves
    finally:
        srv.stop()
