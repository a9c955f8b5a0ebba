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

from console_fixtures import Console, artifacts, browser, console  # noqa: F401  (fixtures)


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


def test_the_ng_bound_is_set_forced_and_reset_from_the_admin_page(console: Console, server: Server) -> None:
    """The Admin page said "PUT ng_threshold to move it" and had no control for it."""
    before = threshold_state(server)
    cal = model_info(server)["calibration"]
    span = cal["score_max"] - cal["score_min"]
    ng = before["calibrated_ng_threshold"] + 0.05 * span  # within the calibration's range
    far = cal["score_max"] + 10 * span
    page = console.page
    with console.on_failure_screenshot():
        open_admin(console)
        page.fill("#ng-input", repr(ng))
        page.click("#ng-apply")
        page.wait_for_selector("#admin-status[data-ng]")
        assert float(page.get_attribute("#admin-status", "data-ng")) == pytest.approx(ng)
        assert "NG bound" in page.inner_text("#admin-status")
        after = threshold_state(server)
        assert after["ng_threshold"] == pytest.approx(ng)
        assert after["threshold"] == before["threshold"]  # the ok bound stays where it was
        page.wait_for_selector("#admin-ng:has-text('(override)')")
        # below the ok bound: the server's reason, nothing changed
        page.fill("#ng-input", repr(before["threshold"] - 0.1 * span))
        page.click("#ng-apply")
        page.wait_for_selector("#error:has-text('invalid_bounds')")
        assert "below threshold" in page.inner_text("#error")
        assert threshold_state(server)["ng_threshold"] == pytest.approx(ng)
        # far above every score: refused, then set once the operator confirms
        page.fill("#ng-input", repr(far))
        page.click("#ng-apply")
        page.wait_for_selector("#threshold-force:not([hidden])")
        assert "NG bound" in page.inner_text("#error") and "Set it anyway" in page.inner_text("#error")
        assert threshold_state(server)["ng_threshold"] == pytest.approx(ng)
        page.click("#threshold-force")
        page.wait_for_selector(f"#admin-status[data-ng='{far!r}']")
        assert threshold_state(server)["ng_threshold"] == pytest.approx(far)
        console.screenshot("ng")
        # the ok bound moves within the range, the forced NG bound kept: that kept bound was
        # checked again and the page asked to force "Threshold <far>", a value nobody typed
        moved = before["threshold"] + 0.01 * span
        page.fill("#threshold-input", repr(moved))
        page.click("#threshold-apply")
        page.wait_for_selector(f"#admin-status[data-threshold='{moved!r}']")
        assert page.is_hidden("#threshold-force")
        assert threshold_state(server)["ng_threshold"] == pytest.approx(far)
        page.click("#ng-reset")
        page.wait_for_selector("#admin-ng:has-text('(calibrated)')")
        page.click("#threshold-reset")
        page.wait_for_selector(f"#admin-status[data-threshold='{before['threshold']!r}']")
    state = threshold_state(server)
    assert state["override"] is None and state["ng_threshold"] == state["calibrated_ng_threshold"]


def reload_to(console: Console, version: str) -> None:
    """Pick ``version`` ("" for the newest), ask for the reload and confirm it."""
    page = console.page
    page.select_option("#version-select", version)
    page.click("#version-reload")
    page.wait_for_selector("#version-confirm:not([hidden])")
    page.click("#version-confirm-yes")


def test_a_category_is_rolled_back_pinned_and_forward_from_the_admin_page(console: Console, server: Server,
                                                                          store: Path) -> None:
    """POST /v1/models/{category}/reload[?version=N] had no control in the console: a rollback
    at the line needed curl and the admin key typed into a shell."""
    page = console.page
    assert (model_info(server)["version"], model_info(server)["pinned"]) == ("2", False)  # 3 fails to load
    with console.on_failure_screenshot():
        open_admin(console)
        page.wait_for_selector("#version-select option[value='1']", state="attached")
        options = page.locator("#version-select option")
        assert [options.nth(i).get_attribute("value") for i in range(options.count())] == ["", "3", "2", "1"]
        assert page.locator("#version-select").input_value() == "2"  # the version served
        assert "truncated" in page.locator("#version-select option[value='3']").inner_text()
        # a confirmation first: cancelled, nothing sent
        page.select_option("#version-select", "1")
        page.click("#version-reload")
        assert "pinned" in page.inner_text("#version-confirm")
        page.click("#version-confirm-no")
        assert page.locator("#version-confirm").is_hidden() and model_info(server)["version"] == "2"
        # the rollback: v1, pinned
        reload_to(console, "1")
        page.wait_for_selector("#version-status[data-version='1'][data-pinned='true']")
        assert (model_info(server)["version"], model_info(server)["pinned"]) == ("1", True)
        page.wait_for_selector("#admin-info dd:has-text('brick v1')")  # the page shows what serves now
        assert "serving, pinned" in page.locator("#version-select option[value='1']").inner_text()
        console.screenshot("pinned")
        # a version that cannot load: the server's reason, v1 serves on
        reload_to(console, "3")
        page.wait_for_selector("#version-status[data-error='reload_failed']")
        assert "truncated" in page.inner_text("#error") and "v1" in page.inner_text("#version-status")
        assert model_info(server)["version"] == "1"
        # a key that is not an admin's: refused, said so, nothing changed
        console.use_key(USER_KEY)
        page.wait_for_selector("#key-status.ok")
        reload_to(console, "")
        page.wait_for_selector("#version-status[data-error='forbidden']")
        assert "admin API key" in page.inner_text("#version-status") and "admin API key" in page.inner_text("#error")
        assert (model_info(server)["version"], model_info(server)["pinned"]) == ("1", True)
        # forward to the newest once the broken export is gone: v2, the pin ended
        console.use_key(ADMIN_KEY)
        page.wait_for_selector("#key-status.ok")
        shutil.rmtree(store / CATEGORY / "3")
        page.click("#admin-refresh")
        page.wait_for_selector("#version-select option[value='3']", state="detached")
        reload_to(console, "")
        page.wait_for_selector("#version-status[data-version='2'][data-pinned='false']")
        assert (model_info(server)["version"], model_info(server)["pinned"]) == ("2", False)
        assert not page.locator("#error").is_visible()
