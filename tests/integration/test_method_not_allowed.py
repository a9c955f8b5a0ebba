"""A 405's ``Allow`` names every method the path serves (RFC 9110 15.5.6), over real HTTP.

Starlette named the methods of the first route whose path matched, and FastAPI makes a
route per method: ``/v1/models/{category}/threshold`` answered ``Allow: GET`` though PUT and
DELETE serve there, and ``/v1/jobs/{job_id}`` ``Allow: POST`` (the path of the submit route,
``/v1/jobs/{category}``, matches it first) though its GET is what serves a job id. Checked
against the served OpenAPI document, so a route added later is checked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from harness import ADMIN_KEY, Server, assert_error, fake_version, start


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("allow")
    fake_version(root / "store", "brick")
    server = start(root / "store", root / "server.log", engine="null", admin_api_keys=ADMIN_KEY)
    yield server
    server.stop()


def allow(r: httpx.Response) -> set[str]:
    return {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}


def test_a_405_allows_every_method_its_path_serves(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as client:
        paths: dict[str, dict[str, object]] = client.get("/openapi.json").json()["paths"]
        # Each route's path with its parameters filled; ids that the jobs routes both match.
        served: dict[str, set[str]] = {}
        for path, operations in paths.items():
            concrete = re.sub(r"\{[^}]+\}", "brick", path)
            served.setdefault(concrete, set()).update(m.upper() for m in operations)
        assert served["/v1/models/brick/threshold"] == {"GET", "PUT", "DELETE"}
        assert served["/v1/jobs/brick"] == {"GET", "POST"}  # /v1/jobs/{category} and /v1/jobs/{job_id}
        for concrete, methods in served.items():
            for method in ("PATCH", "OPTIONS"):
                r = client.request(method, concrete)
                assert_error(r, 405, "method_not_allowed")
                assert allow(r) >= methods and not allow(r) & {"PATCH", "OPTIONS"}, (method, concrete, allow(r))
        # The method Allow names is served: PUT reaches the threshold route (its body checked).
        assert allow(client.patch("/v1/models/brick/threshold")) == {"GET", "PUT", "DELETE"}
        assert client.put("/v1/models/brick/threshold", json={}).status_code == 422


def test_a_static_files_405_keeps_its_own_allow(server: Server) -> None:
    r = httpx.post(f"{server.url}/static/console.js")
    assert r.status_code == 405 and allow(r) == {"GET", "HEAD"}
