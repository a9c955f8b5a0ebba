"""Keyed routes refuse a request without a valid key before they read its body.

FastAPI reads and parses a route's JSON body before it resolves any dependency, the key check
included: a request without a key and with malformed JSON (or bytes that are not UTF-8) to
the threshold or the label route was answered 422 ``invalid_request`` describing its body,
where admin and review routes fail closed. Every keyed route is tried, enumerated from the
served OpenAPI document (each operation with a key scheme), so a route added later is covered.
A real ``msflow serve`` (null engine, hand-written version)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, assert_error, fake_version, start

REVIEWER_KEY = "reviewer-key-789"
# A value of each path parameter that its route's own checks accept (a well-formed id).
PATH_VALUES = {"category": CATEGORY, "item_id": "20260101T000000000000-review-0000000001-0123456789ab",
               "heatmap_id": "A" * 32, "job_id": "B" * 24, "name": "roc.png"}
BODIES = {
    "malformed JSON": b'{"threshold": ',
    "not UTF-8": b'{"label": "ok", "note": "\xff"}',
    "nested too deeply": b"[" * 50_000,
}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("keys-first")
    fake_version(root / "store", CATEGORY)
    srv = start(root / "store", root / "server.log", engine="null", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                reviewer_api_keys={"rita": REVIEWER_KEY}, review_store=str(root / "review"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No keys at all: admin and review routes closed."""
    root = tmp_path_factory.mktemp("keys-first-closed")
    fake_version(root / "store", CATEGORY)
    srv = start(root / "store", root / "server.log", engine="null", review_store=str(root / "review"))
    yield srv
    srv.stop()


def keyed_operations(server: Server) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path with its parameters filled in, operation) of every operation with a key scheme."""
    doc = httpx.get(server.url + "/openapi.json").json()
    return [(method.upper(), path.format(**PATH_VALUES), op) for path, ops in doc["paths"].items()
            for method, op in ops.items() if op.get("security")]


def refuses(op: dict[str, Any], code: str) -> bool:
    return f"`{code}`" in op["responses"].get("403", {}).get("description", "")


def test_the_document_names_the_keyed_routes_with_a_json_body(keyed: Server) -> None:
    """What the tests below rely on: the routes that parse a body are among those enumerated."""
    with_body = {(method, path) for method, path, op in keyed_operations(keyed)
                 if "application/json" in op.get("requestBody", {}).get("content", {})}
    assert {("PUT", f"/v1/models/{CATEGORY}/threshold"),
            ("PUT", f"/v1/review/{CATEGORY}/items/{PATH_VALUES['item_id']}/label")} <= with_body, with_body


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_every_keyed_route_refuses_a_missing_or_wrong_key_before_its_body(keyed: Server, body: bytes) -> None:
    operations = keyed_operations(keyed)
    assert len(operations) >= 15, operations
    with httpx.Client(base_url=keyed.url, timeout=10) as client:
        for method, path, op in operations:
            where = f"{method} {path}"
            r = client.request(method, path, content=body, headers=JSON)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", (where, r.text)
            r = client.request(method, path, content=body, headers={**JSON, "X-API-Key": "not-a-key"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (where, r.text)
            if refuses(op, "forbidden"):  # admin and review routes: an inspection key is known, not allowed
                r = client.request(method, path, content=body, headers={**JSON, "X-API-Key": USER_KEY})
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (where, r.text)


def test_closed_admin_and_review_routes_refuse_before_the_body(keyless: Server) -> None:
    closed = [(method, path, "admin_disabled" if refuses(op, "admin_disabled") else "review_disabled")
              for method, path, op in keyed_operations(keyless)
              if refuses(op, "admin_disabled") or refuses(op, "review_disabled")]
    assert len(closed) >= 10, closed
    with httpx.Client(base_url=keyless.url, timeout=10) as client:
        for method, path, code in closed:
            assert_error(client.request(method, path, content=BODIES["malformed JSON"], headers=JSON), 403, code)


def test_a_valid_key_still_gets_the_body_refused(keyed: Server) -> None:
    """The key first, then the body as before: malformed JSON from an admin is 422."""
    r = httpx.put(f"{keyed.url}/v1/models/{CATEGORY}/threshold", content=BODIES["malformed JSON"],
                  headers={**JSON, "X-API-Key": ADMIN_KEY})
    assert_error(r, 422, "invalid_request")
    r = httpx.put(f"{keyed.url}/v1/review/{CATEGORY}/items/{PATH_VALUES['item_id']}/label",
                  content=BODIES["not UTF-8"], headers={**JSON, "X-API-Key": REVIEWER_KEY})
    assert_error(r, 422, "invalid_request")
