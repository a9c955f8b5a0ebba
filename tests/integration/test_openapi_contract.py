"""The served OpenAPI document is the contract: real answers of a real server (keys of every
kind configured) are checked against ``GET /openapi.json``: each status documented on its
operation, each media type, each JSON body valid against its schema (``jsonschema``), each
header the answer carries documented. Beside it, what the document must say for a client
generated from it to work: the upload routes' bodies, the key schemes, the statuses each
route can answer and no others, the headers of the answers, and the answers of the
connection layer below the app (which carry an ``X-Request-ID`` too)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import zipfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from service.api.jobs import IDEMPOTENCY_KEY

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, assert_error, png_variant, start, wait_until

REVIEWER_KEY = "reviewer-key-789"
QUEUE = 3  # MSFLOW_MAX_QUEUE_SIZE, below MSFLOW_MAX_FILES_PER_REQUEST
MAX_FILES = 4
DEADLINE_S = 3.0
INSPECT = f"/v1/inspect/{CATEGORY}"
# Headers every answer carries (service/api/security_headers.py, and what HTTP itself says):
# not the API's to document per answer.
_GENERIC = {"x-frame-options", "x-content-type-options", "cache-control", "content-type", "content-length",
            "content-disposition", "date", "server", "connection", "transfer-encoding", "etag", "last-modified",
            "accept-ranges", "vary"}
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("contract") / "store"
    shutil.copytree(model_store, store, ignore=shutil.ignore_patterns(".review"))
    # A review store of its own: the shared model store's (where other tests' servers kept
    # these same images) refused them as duplicates.
    srv = start(store, tmp_path_factory.mktemp("logs") / "contract.log", api_keys=USER_KEY,
                review_store=str(tmp_path_factory.mktemp("contract-review")),
                admin_api_keys=ADMIN_KEY, reviewer_api_keys={"rita": REVIEWER_KEY}, review_audit_rate=1.0,
                max_files_per_request=MAX_FILES, max_queue_size=QUEUE, request_deadline_ms=DEADLINE_S * 1e3)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def doc(server: Server) -> dict[str, Any]:
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def image(demo_root: Path) -> bytes:
    return sorted((demo_root / CATEGORY / "test" / "good").glob("*.png"))[0].read_bytes()


def _kept(server: Server, demo_root: Path, index: int) -> dict[str, Any]:
    """The review item of a good test image, its bytes made unique (the store refuses an image
    it holds already, and other tests inspect the same demo images), inspected now and kept
    (review_audit_rate 1). Captures are written after the answer through a bounded queue, which
    this module's bursts can fill (a capture is then dropped, by design): sent again, as
    another variant, until one is kept."""
    path = sorted((demo_root / CATEGORY / "test" / "good").glob("*.png"))[index]
    name = f"kept-{index}.png"
    with _client(server, USER_KEY) as c, _client(server, REVIEWER_KEY) as reviewer:
        def kept() -> dict[str, Any] | None:
            items = reviewer.get(f"/v1/review/{CATEGORY}/items", params={"limit": 100}).json()["items"]
            return next((e for e in items if e["item"]["filename"] == name), None)

        for attempt in range(5):
            data = png_variant(path, f"contract-kept-{index}-{attempt}")
            assert c.post(INSPECT, params={"heatmap": "none"}, files=[("file", (name, data, "image/png"))],
                          ).status_code == 200
            with contextlib.suppress(AssertionError):
                return wait_until(kept, 8, f"{name} in the review store", interval=0.2)
        raise AssertionError(f"{name}: not kept in the review store after 5 inspections")


def _operation(doc: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    for template, operations in doc["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path}: no operation in the document")


def conforms(doc: dict[str, Any], r: httpx.Response) -> httpx.Response:
    """``r`` as its operation in ``doc`` documents it: status, media type, JSON schema,
    required headers present, and every header it carries documented (but HTTP's own and
    the security headers every answer carries)."""
    method, path = r.request.method, r.request.url.path
    template, op = _operation(doc, method, path)
    where = f"{method} {template} -> {r.status_code}"
    response = op["responses"].get(str(r.status_code))
    assert response is not None, f"{where}: status not documented (documented: {sorted(op['responses'])})"
    media = r.headers.get("content-type", "").split(";")[0].strip()
    content = response.get("content", {})
    assert media in content or any(m.endswith("/*") and media.startswith(m[:-1]) for m in content), (
        f"{where}: {media} not documented ({list(content)})")
    schema = content.get(media, {}).get("schema")
    if media == "application/json" and schema:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in Draft202012Validator({**doc, **schema}).iter_errors(r.json())]
        assert not errors, f"{where}: the body does not match its schema: {errors[:3]}"
    documented = {name.lower(): spec for name, spec in response.get("headers", {}).items()}
    for name, spec in documented.items():
        if spec.get("required"):
            assert name in r.headers, f"{where}: required header {name} missing"
    for name in r.headers:
        if name.lower() not in _GENERIC:
            assert name.lower() in documented, f"{where}: header {name} not documented ({list(documented)})"
    assert r.headers["x-request-id"], where
    return r


def refused(doc: dict[str, Any], r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error ``r`` must be (checked first: the behaviour), then as the document says it."""
    error = assert_error(r, status, code)
    conforms(doc, r)
    return error


def _client(server: Server, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key} if key else {}, timeout=60)


def _raw(server: Server, request: bytes, wait_s: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """What the server answers ``request`` sent on a socket of its own (until it closes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


# ---------------------------------------------------------------------- the document itself
def test_the_upload_routes_document_their_bodies(doc: dict[str, Any]) -> None:
    """A client generated from the document could not send an image: neither upload route
    had a request body."""
    for path in ("/v1/inspect/{category}", "/v1/jobs/{category}"):
        op = doc["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        form = body["content"]["multipart/form-data"]["schema"]["properties"]
        for name in ("files", "file"):
            assert form[name]["type"] == "array" and form[name]["items"] == {"type": "string", "format": "binary"}
        for media in ("image/png", "image/jpeg", "application/octet-stream"):
            assert body["content"][media]["schema"] == {"type": "string", "format": "binary"}, (path, media)
        headers = {p["name"].lower(): p for p in op["parameters"] if p["in"] == "header"}
        assert headers["x-filename"]["required"] is False and headers["x-filename"]["schema"]["type"] == "string"


def test_v1_routes_declare_both_key_schemes_and_health_routes_none(doc: dict[str, Any]) -> None:
    schemes = doc["components"]["securitySchemes"]
    assert {"type": "apiKey", "in": "header", "name": "X-API-Key"}.items() <= schemes["ApiKeyHeader"].items()
    assert {"type": "http", "scheme": "bearer"}.items() <= schemes["BearerAuth"].items()
    v1 = 0
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            if path.startswith("/v1/"):
                v1 += 1
                assert op.get("security") == [{"ApiKeyHeader": []}, {"BearerAuth": []}], (method, path)
            else:
                assert "security" not in op, (method, path)
    assert v1 >= 19 and "security" not in doc  # no global requirement: /healthz and /readyz need none


def test_each_route_lists_what_it_can_answer(doc: dict[str, Any]) -> None:
    """501 was listed everywhere (nothing answers it), 406 and 504 on routes that never answer
    them; 413 was missing on the routes with a JSON body (the 64 KiB limit answers it)."""
    ops = {(method, path): op for path, operations in doc["paths"].items() for method, op in operations.items()}
    for (method, path), op in ops.items():
        statuses = set(op["responses"])
        assert "501" not in statuses, (method, path)
        if (method, path) != ("post", "/v1/inspect/{category}"):
            assert not {"406", "504"} & statuses, (method, path, statuses)
        if method == "get":
            assert "413" not in statuses and "415" not in statuses, (method, path)
        if path.startswith("/v1/"):
            assert {"401", "500"} <= statuses, (method, path)
    assert {"406", "408", "413", "504"} <= set(ops[("post", "/v1/inspect/{category}")]["responses"])
    assert "408" in ops[("post", "/v1/jobs/{category}")]["responses"]
    for key in (("put", "/v1/models/{category}/threshold"), ("put", "/v1/review/{category}/items/{item_id}/label")):
        assert "413" in ops[key]["responses"], key
    assert "404" not in ops[("get", "/v1/models")]["responses"]  # no path parameter to miss
    # FastAPI's own 422 (HTTPValidationError) is no answer of this API: its 422 is the error shape
    for (method, path), op in ops.items():
        if "422" in op["responses"]:
            schema = op["responses"]["422"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    assert "422" not in ops[("get", "/v1/heatmaps/{heatmap_id}.png")]["responses"]  # a string: nothing to refuse
    assert "403" not in ops[("get", "/v1/models/{category}")]["responses"]  # a GET with an API key: 401 only


def test_answer_headers_are_documented(doc: dict[str, Any]) -> None:
    inspect_ok = doc["paths"]["/v1/inspect/{category}"]["post"]["responses"]["200"]
    assert "image/png" in inspect_ok["content"]
    for name in ("X-Anomaly-Score", "X-Raw-Score", "X-Threshold", "X-Is-Anomalous", "X-Verdict", "X-Ng-Threshold",
                 "X-Model-Version", "X-Engine", "X-Image-Size", "X-Heatmap-Size", "X-Request-ID"):
        assert name in inspect_ok["headers"], name
    assert "Location" in doc["paths"]["/v1/jobs/{category}"]["post"]["responses"]["202"]["headers"]
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for status, response in op["responses"].items():
                assert "X-Request-ID" in response.get("headers", {}), (method, path, status)
                if status == "503" and path.startswith("/v1/"):
                    assert "Retry-After" in response["headers"], (method, path)


def test_the_idempotency_key_documents_its_pattern(doc: dict[str, Any]) -> None:
    (param,) = [p for p in doc["paths"]["/v1/jobs/{category}"]["post"]["parameters"]
                if p["name"].lower() == "idempotency-key"]
    assert param["schema"]["pattern"] == IDEMPOTENCY_KEY.pattern and param["schema"]["maxLength"] == 128
    assert param["schema"]["type"] == "string"


def test_the_layers_below_the_routes_are_documented_once(doc: dict[str, Any]) -> None:
    description = doc["info"]["description"]
    for status, code in ((431, "header_too_large"), (408, "request_timeout"), (400, "bad_request"),
                         (429, "too_many_pipelined_requests"), (503, "too_many_connections"),
                         (413, "request_too_large")):
        assert f"| {status} | `{code}` |" in description, code
    assert "X-Request-ID" in description and "Retry-After: 1" in description


# ---------------------------------------------------------------------- real answers against it
def test_inspection_answers_conform(server: Server, doc: dict[str, Any], image: bytes) -> None:
    with _client(server, USER_KEY) as c:
        r = conforms(doc, c.post(INSPECT, files=[("file", ("a.png", image, "image/png"))]))
        assert r.status_code == 200 and r.json()["results"][0]["heatmap"]["format"] == "png"
        r = conforms(doc, c.post(INSPECT, params={"heatmap": "none"},
                                 files=[("files", ("a.png", image, "image/png")), ("files", ("b.png", image, "image/png"))]))
        assert [x["filename"] for x in r.json()["results"]] == ["a.png", "b.png"]
        for media in ("image/png", "application/octet-stream"):
            r = conforms(doc, c.post(INSPECT, params={"heatmap": "none"}, content=image,
                                     headers={"Content-Type": media, "X-Filename": "cam1.png"}))
            assert r.json()["results"][0]["filename"] == "cam1.png"
        linked = conforms(doc, c.post(INSPECT, params={"heatmap": "url"}, files=[("file", ("a.png", image, "image/png"))]))
        url = linked.json()["results"][0]["heatmap"]["url"]
        assert conforms(doc, c.get(url)).headers["content-type"] == "image/png"
        refused(doc, c.get("/v1/heatmaps/" + "a" * 32 + ".png"), 404, "heatmap_not_found")
        # the PNG answer and its headers
        r = conforms(doc, c.post(INSPECT, headers={"Accept": "image/png"}, files=[("file", ("a.png", image, "image/png"))]))
        assert r.headers["content-type"] == "image/png"
        for name in ("x-anomaly-score", "x-raw-score", "x-threshold", "x-is-anomalous", "x-verdict", "x-ng-threshold",
                     "x-model-version", "x-engine", "x-image-size", "x-heatmap-size"):
            assert r.headers[name], name
        # errors
        refused(doc, c.post("/v1/inspect/nosuch", files=[("file", ("a.png", image, "image/png"))]),
                     404, "unknown_category")
        refused(doc, c.post(INSPECT, content=b"hi", headers={"Content-Type": "text/plain"}), 415,
                     "unsupported_media_type")
        refused(doc, c.post(INSPECT, files=[("image", ("a.png", image, "image/png"))]), 400, "bad_upload")
        refused(doc, c.post(INSPECT, params={"heatmap": "x"}, files=[("file", ("a.png", image, "image/png"))]),
                     422, "invalid_request")
        refused(doc, c.post(INSPECT, files=[("file", ("t.png", image[:200], "image/png"))]), 422,
                     "undecodable_image")
        refused(doc, c.post(INSPECT, files=[("file", ("a.png", image, "image/png"))] * (MAX_FILES + 1)),
                     413, "too_many_files")
        refused(doc, c.post(INSPECT, files=[("file", ("a.png", image, "image/png"))],
                                          headers={"Sec-Fetch-Site": "cross-site"}), 403, "cross_site_refused")
    r = conforms(doc, httpx.post(server.url + INSPECT, files=[("file", ("a.png", image, "image/png"))]))
    assert_error(r, 401, "missing_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(server.url + INSPECT, params={"heatmap": "none"}, files=[("file", ("a.png", image, "image/png"))],
                   headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60)
    assert conforms(doc, r).status_code == 200


def test_a_request_the_queue_cannot_hold_is_413_not_a_503_no_retry_can_satisfy(server: Server, doc: dict[str, Any],
                                                                               image: bytes) -> None:
    """MSFLOW_MAX_QUEUE_SIZE (3) below MSFLOW_MAX_FILES_PER_REQUEST (4): a request's images are
    queued together, so four could never be served; it was 503 queue_full with a Retry-After."""
    with _client(server, USER_KEY) as c:
        r = c.post(INSPECT, params={"heatmap": "none"}, files=[("file", ("a.png", image, "image/png"))] * (QUEUE + 1))
        error = refused(doc, r, 413, "too_many_files")
        assert "retry-after" not in r.headers and "MSFLOW_MAX_QUEUE_SIZE" in error["message"]
        assert error["details"] == {"limit": QUEUE, "max_queue_size": QUEUE, "max_files_per_request": MAX_FILES}
        r = c.post(INSPECT, params={"heatmap": "none"}, files=[("file", ("a.png", image, "image/png"))] * QUEUE)
        assert r.status_code == 200 and len(r.json()["results"]) == QUEUE
        conforms(doc, r)


def test_accept_and_heatmap_agree(server: Server, doc: dict[str, Any], image: bytes) -> None:
    """An image/png answer is the heatmap itself: with heatmap=none or url it answered the PNG
    anyway, the parameter ignored; an Accept taking neither JSON nor PNG got JSON, where the
    document says 406."""
    files = [("file", ("a.png", image, "image/png"))]
    with _client(server, USER_KEY) as c:
        for mode in ("none", "url"):
            r = c.post(INSPECT, params={"heatmap": mode}, headers={"Accept": "image/png"}, files=files)
            assert "heatmap=" + mode in refused(doc, r, 406, "not_acceptable")["message"]
            r = c.post(INSPECT, params={"heatmap": mode}, files=files,
                       headers={"Accept": "image/png, application/json;q=0.5"})
            assert r.headers["content-type"] == "application/json"
            assert (r.json()["results"][0]["heatmap"] is None) == (mode == "none")
            conforms(doc, r)
        for accept in ("text/html", "application/json;q=0"):
            refused(doc, c.post(INSPECT, headers={"Accept": accept}, files=files), 406, "not_acceptable")
        for accept in ("*/*", "application/*", "image/png;q=0.5, application/json"):
            r = conforms(doc, c.post(INSPECT, params={"heatmap": "none"}, headers={"Accept": accept}, files=files))
            assert r.headers["content-type"] == "application/json", accept


def test_a_late_upload_is_408_on_both_upload_routes(server: Server, doc: dict[str, Any]) -> None:
    """POST /v1/inspect answered a body still arriving at its deadline 504 deadline_exceeded
    (a server error, counted in the inspect 5xx alert), POST /v1/jobs and every other route
    408 request_timeout."""
    status, headers, body = _raw(server, (
        f"POST {INSPECT} HTTP/1.1\r\nHost: x\r\nX-API-Key: {USER_KEY}\r\nContent-Type: image/png\r\n"
        "Content-Length: 100000\r\n\r\nabc").encode(), wait_s=DEADLINE_S + 10)
    assert (status, json.loads(body)["error"]["code"]) == (408, "request_timeout"), body
    assert "408" in doc["paths"]["/v1/inspect/{category}"]["post"]["responses"]
    assert headers["x-request-id"]


def test_connection_layer_answers_carry_a_request_id(server: Server) -> None:
    """README: every answer carries an X-Request-ID; the connection layer's did not."""
    status, headers, body = _raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == "header_too_large"
    first = headers["x-request-id"]
    status, headers, body = _raw(server, b"GARBAGE\r\n\r\n")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    assert _HEX_ID.match(first) and _HEX_ID.match(headers["x-request-id"]) and headers["x-request-id"] != first


def test_jobs_and_models_answers_conform(server: Server, doc: dict[str, Any], image: bytes) -> None:
    files = [("file", ("a.png", image, "image/png"))]
    with _client(server, USER_KEY) as c, _client(server, ADMIN_KEY) as admin:
        r = conforms(doc, c.post(f"/v1/jobs/{CATEGORY}", files=files))
        assert_error(r, 503, "redis_required")  # no Redis on this server
        refused(doc, c.post(f"/v1/jobs/{CATEGORY}", files=files, headers={"Idempotency-Key": "bad key!"}),
                     400, "bad_idempotency_key")
        refused(doc, c.get("/v1/jobs/abc"), 503, "redis_required")
        assert conforms(doc, c.get("/v1/models")).json()["models"][0]["category"] == CATEGORY
        conforms(doc, c.get(f"/v1/models/{CATEGORY}"))
        refused(doc, c.get("/v1/models/nosuch"), 404, "unknown_category")
        refused(doc, c.post(f"/v1/models/{CATEGORY}/reload"), 403, "forbidden")
        refused(doc, admin.post(f"/v1/models/{CATEGORY}/reload", params={"version": "99"}), 404,
                     "version_not_found")
        refused(doc, admin.post(f"/v1/models/{CATEGORY}/reload", params={"version": "9" * 65}), 422,
                     "invalid_request")
        refused(doc, c.get(f"/v1/models/{CATEGORY}/assets/x.txt"), 404, "asset_not_found")
        threshold = conforms(doc, c.get(f"/v1/models/{CATEGORY}/threshold")).json()["calibrated_threshold"]
        conforms(doc, admin.put(f"/v1/models/{CATEGORY}/threshold", json={"threshold": threshold}))
        refused(doc, admin.put(f"/v1/models/{CATEGORY}/threshold", json={"threshold": 1e30}), 422,
                     "threshold_out_of_range")
        refused(doc, admin.put(f"/v1/models/{CATEGORY}/threshold",
                                             json={"threshold": threshold, "version": "zz"}), 409, "version_changed")
        refused(doc, admin.put(f"/v1/models/{CATEGORY}/threshold", content=b" " * 70_000,
                                             headers={"Content-Type": "application/json"}), 413, "request_too_large")
        assert conforms(doc, admin.delete(f"/v1/models/{CATEGORY}/threshold")).json()["override"] is None
        conforms(doc, admin.get(f"/v1/models/{CATEGORY}/recent", params={"threshold": threshold}))
        refused(doc, c.get(f"/v1/models/{CATEGORY}/recent"), 403, "forbidden")
        refused(doc, admin.get(f"/v1/models/{CATEGORY}/recent", params={"limit": 0}), 422,
                     "invalid_request")
    for path in ("/healthz", "/readyz"):
        conforms(doc, httpx.get(server.url + path))


def test_admin_routes_answer_401_to_a_request_without_a_key_first(server: Server, doc: dict[str, Any]) -> None:
    """With keys configured, POST .../reload without a key or a body answered 403
    cross_site_refused (the cross-site guard ran before the key check); with a JSON content
    type, 401. Keyless servers keep the guard (tests/integration/test_fail_closed.py)."""
    for headers in ({}, {"Content-Type": "application/json"}, {"Sec-Fetch-Site": "cross-site"}):
        refused(doc, httpx.post(server.url + f"/v1/models/{CATEGORY}/reload", headers=headers), 401, "missing_api_key")
    r = httpx.put(server.url + f"/v1/review/{CATEGORY}/items/x/label", json={"label": "ok"},
                  headers={"Sec-Fetch-Site": "cross-site"})
    refused(doc, r, 401, "missing_api_key")
    # a key from another site's page is still refused
    r = httpx.post(server.url + f"/v1/models/{CATEGORY}/reload",
                   headers={"X-API-Key": ADMIN_KEY, "Sec-Fetch-Site": "cross-site"})
    refused(doc, r, 403, "cross_site_refused")


def test_a_defect_type_goes_with_ng_only(server: Server, doc: dict[str, Any], demo_root: Path) -> None:
    """``{"label": "ok", "defect_type": "scratch"}`` was answered 200 with the defect type
    dropped without a word; the console sends a defect type with ng labels only
    (service/static/review.js), so no client of ours sends the pair."""
    base = f"/v1/review/{CATEGORY}"
    item_id = _kept(server, demo_root, 1)["item"]["id"]
    with _client(server, REVIEWER_KEY) as reviewer:
        label = f"{base}/items/{item_id}/label"
        error = refused(doc, reviewer.put(label, json={"label": "ok", "defect_type": "scratch"}), 422,
                        "invalid_request")
        assert "defect_type" in error["message"]
        assert reviewer.get(f"{base}/items/{item_id}").json()["label"] is None  # nothing recorded
        r = reviewer.put(label, json={"label": "ng", "defect_type": "scratch"})
        assert r.status_code == 200 and r.json()["label"]["defect_type"] == "scratch"
        r = reviewer.put(label, json={"label": "ok"})
        assert r.status_code == 200 and r.json()["label"]["defect_type"] is None
        assert r.json()["previous"]["label"] == "ng"


def test_review_answers_conform(server: Server, doc: dict[str, Any], demo_root: Path) -> None:
    base = f"/v1/review/{CATEGORY}"
    entry = _kept(server, demo_root, 2)
    item_id = entry["item"]["id"]
    with _client(server, USER_KEY) as c, _client(server, REVIEWER_KEY) as reviewer:
        assert conforms(doc, reviewer.get(f"{base}/items", params={"limit": 100})).json()["items"]
        conforms(doc, reviewer.get(f"{base}/items/{item_id}"))
        conforms(doc, reviewer.get(entry["image_url"]))
        refused(doc, reviewer.get(f"{base}/items/nope"), 404, "review_item_not_found")
        refused(doc, reviewer.get(f"{base}/items", params={"limit": 0}), 422, "invalid_request")
        refused(doc, c.get(f"{base}/items"), 403, "forbidden")
        label = f"{base}/items/{item_id}/label"
        assert conforms(doc, reviewer.put(label, json={"label": "ng", "defect_type": "hole"})).status_code == 200
        refused(doc, reviewer.put(label, json={"label": "ok", "note": "x" * 70_000}), 413, "request_too_large")
        conforms(doc, reviewer.get(f"{base}/stats"))
        export = conforms(doc, reviewer.get(f"{base}/export"))
        assert "labels.jsonl" in zipfile.ZipFile(BytesIO(export.content)).namelist()
        refused(doc, reviewer.get("/v1/review/nosuch/stats"), 404, "unknown_category")
