"""The console's Admin page in a real headless Chromium against a real ``msflow serve`` (the
browser, the ``Console`` driver and their fixtures: console_fixtures.py): what an operator
next to a line needs there beyond the ok threshold.

* a threshold out of the sane range: the page said the API's ``send "force": true`` beside
  its own "Set it anyway" button;
* the NG bound: "PUT ng_threshold to move it", and no control to do it;
* a rollback (or forward): ``POST /v1/models/{category}/reload[?version=N]`` had no control.

The store holds the test model as versions 1 and 2, and a version 3 whose model file is
truncated (it fails to load: 2 serves).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, start

from console_fixtures import Console, artifacts, browser  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("console-admin") / "store"
    shutil.copytree(model_store, root)
    manifest = json.loads((root / CATEGORY / "1" / "manifest.json").read_text())
    for version in ("2", "3"):
        shutil.copytree(root / CATEGORY / "1", root / CATEGORY / version)
        (root / CATEGORY / version / "manifest.json").write_text(json.dumps({**manifest, "version": version}))
    (root / CATEGORY / "3" / manifest["onnx"]["file"]).write_bytes(b"truncated")
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(store, tmp_path_factory.mktemp("logs") / "console-admin.log", api_keys=USER_KEY,
                admin_api_keys=ADMIN_KEY)
    yield srv
    srv.stop()


@pytest.fixture
def console(browser: Any, server: Server, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Console]:
    c = Console(browser, server, artifacts, request.node.name)
    yield c
    c.close()


def threshold_state(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.url}/v1/models/{CATEGORY}/threshold", headers={"X-API-Key": USER_KEY}).json()


def model_info(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.url}/v1/models/{CATEGORY}", headers={"X-API-Key": USER_KEY}).json()


def open_admin(console: Console, key: str = ADMIN_KEY) -> None:
    console.open()
    console.use_key(key)
    console.wait_models()
    console.tab("admin")
    console.page.wait_for_selector("#admin-effective")


def test_an_out_of_range_threshold_is_explained_in_the_consoles_terms(console: Console, server: Server) -> None:
    """The refusal's text is the API's ("send "force": true to set it anyway"), a body field
    the operator never sees; the console's way to do it is its "Set it anyway" button."""
    cal = model_info(server)["calibration"]
    far = cal["score_max"] + 10 * (cal["score_max"] - cal["score_min"])
    with console.on_failure_screenshot():
        open_admin(console)
        console.page.fill("#threshold-input", repr(far))
        console.page.click("#threshold-apply")
        console.page.wait_for_selector("#threshold-force:not([hidden])")
        text = console.page.inner_text("#error")
        assert '"force"' not in text and "force" not in text.lower(), text
        assert "Set it anyway" in text and "threshold_out_of_range" in text, text
        console.screenshot("out-of-range")
    assert threshold_state(server)["override"] is None  # nothing set without the button
