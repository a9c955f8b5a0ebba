"""Request bodies against the served OpenAPI document, as a fuzzer driven by that document
(schemathesis) found them: a JSON body the server cannot read is answered with a status its
route documents, and the document admits no body the server always refuses. Real server,
real answers; the document checked with ``jsonschema``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, start
from test_openapi_contract import conforms, doc, refused  # noqa: F401  (doc: a fixture, on this module's server)

REVIEWER_KEY = "reviewer-key-789"
THRESHOLD = f"/v1/models/{CATEGORY}/threshold"
LABEL = f"/v1/review/{CATEGORY}/items/20260101T000000000000-ok-0000000001-000000000000/label"


@pytest.fixture(scope="module")
def server(module_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(module_store, tmp_path_factory.mktemp("logs") / "bodies.log", api_keys=USER_KEY,
                admin_api_keys=ADMIN_KEY, reviewer_api_keys={"rita": REVIEWER_KEY},
                review_store=str(tmp_path_factory.mktemp("bodies-review")))
    yield srv
    srv.stop()


def _put(server: Server, path: str, key: str, body: bytes) -> httpx.Response:
    return httpx.put(server.url + path, content=body, timeout=30,
                     headers={"X-API-Key": key, "Content-Type": "application/json"})


def test_a_json_body_the_server_cannot_read_is_422_as_documented(server: Server, doc: dict[str, Any]) -> None:
    """A body that is not UTF-8 (a note typed on a Latin-1 client) or nested past the
    decoder's limit was 400 bad_request 'There was an error parsing the body': a status
    neither JSON route documents, naming neither what was wrong nor where. Now 422
    invalid_request, as malformed JSON is, and nothing changes."""
    before = httpx.get(server.url + THRESHOLD, headers={"X-API-Key": ADMIN_KEY}).json()
    latin1 = '{"label": "ng", "defect_type": "scratch", "note": "Kratzer l\xe4ngs"}'.encode("latin-1")
    error = refused(doc, _put(server, LABEL, REVIEWER_KEY, latin1), 422, "invalid_request")
    assert "not UTF-8" in error["message"] and "xe4" in error["message"], error
    error = refused(doc, _put(server, THRESHOLD, ADMIN_KEY, b'{"threshold": 2.5, "n": "\xff"}'), 422, "invalid_request")
    assert "not UTF-8" in error["message"], error
    deep = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB body limit, past the recursion limit
    error = refused(doc, _put(server, THRESHOLD, ADMIN_KEY, deep), 422, "invalid_request")
    assert "nested too deeply" in error["message"], error
    assert httpx.get(server.url + THRESHOLD, headers={"X-API-Key": ADMIN_KEY}).json() == before
    # a readable body still reaches the route (and UTF-8 text is fine)
    ok = '{"threshold": %r, "force": true}' % before["threshold"]
    conforms(doc, _put(server, THRESHOLD, ADMIN_KEY, ok.encode()))


def _request_schema(doc: dict[str, Any], method: str, path: str, media: str) -> Draft202012Validator:
    schema = doc["paths"][path][method]["requestBody"]["content"][media]["schema"]
    return Draft202012Validator({**doc, **schema})  # the document at the root: its $refs resolve


def test_the_document_admits_no_body_the_server_always_refuses(server: Server, doc: dict[str, Any]) -> None:
    """Bodies valid against the document that the server refuses whatever the state: a
    threshold update with neither bound (422), an ok label with a defect type (422), a form
    with no part named files or file (400). A client generated from the document built them
    without a word; now the document refuses them too, and still admits what the server takes."""
    threshold = _request_schema(doc, "put", "/v1/models/{category}/threshold", "application/json")
    label = _request_schema(doc, "put", "/v1/review/{category}/items/{item_id}/label", "application/json")
    for body in ({}, {"threshold": None}, {"force": True}, {"version": "1", "threshold": None}):
        assert not threshold.is_valid(body), body
        refused(doc, _put(server, THRESHOLD, ADMIN_KEY, json.dumps(body).encode()), 422, "invalid_request")
    for body in ({"label": "ok", "defect_type": "scratch"}, {"label": "ok", "defect_type": "stain", "note": "x"}):
        assert not label.is_valid(body), body
        refused(doc, _put(server, LABEL, REVIEWER_KEY, json.dumps(body).encode()), 422, "invalid_request")
    for body in ({"threshold": 2.5}, {"ng_threshold": 3.0, "force": True}, {"threshold": 1, "ng_threshold": 2},
                 {"version": "1", "ng_threshold": None}):  # null: back to the manifest's NG bound
        assert threshold.is_valid(body), body
    for body in ({"label": "ok"}, {"label": "ok", "defect_type": None}, {"label": "ng", "defect_type": "scratch"}):
        assert label.is_valid(body), body
    for path in ("/v1/inspect/{category}", "/v1/jobs/{category}"):
        form = _request_schema(doc, "post", path, "multipart/form-data")
        for body in ({}, {"other": ["x"]}, {"files": []}):
            assert not form.is_valid(body), (path, body)
        for body in ({"files": ["x"]}, {"file": ["x", "y"]}, {"files": ["x"], "file": ["y"]}):
            assert form.is_valid(body), (path, body)
    # (the jobs route, without Redis here, answers 503 redis_required before it reads a body)
    r = httpx.post(server.url + f"/v1/inspect/{CATEGORY}", headers={"X-API-Key": USER_KEY},
                   files=[("other", ("a.png", b"\x89PNG", "image/png"))])
    assert "'files' or 'file'" in refused(doc, r, 400, "bad_upload")["message"]
