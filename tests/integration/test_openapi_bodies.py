"""Request bodies against the served OpenAPI document, as a fuzzer driven by that document
(schemathesis) found them: a JSON body the server cannot read is answered with a status its
route documents. Real server, real answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, start
from test_openapi_contract import conforms, refused

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


@pytest.fixture(scope="module")
def doc(server: Server) -> dict[str, Any]:
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


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

