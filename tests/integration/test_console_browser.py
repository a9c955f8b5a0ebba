"""The operator console in a real headless Chromium (Debian's ``chromium`` package, see
``scripts/install-browser.sh``) driven by Playwright, against a real ``msflow serve``.

The page runs under its production Content-Security-Policy (no ``bypass_csp``), so
everything here also proves the console works without inline scripts or other origins.
Waits use selectors and data attributes the console sets (``wait_for_function`` would need
``eval``, which that policy forbids). On failure a screenshot goes to
``$MSFLOW_TEST_ARTIFACTS`` (default: a pytest temporary folder) and the failure message
names it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.build_progress import record_build, record_step
from service.pipeline.regions import box_mask
from service.schemas import Region
from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, start

from console_fixtures import REVIEWER_KEY, Console, artifacts, browser, console, samples, start_review_server  # noqa: F401  (fixtures)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("console") / "store"
    shutil.copytree(model_store, store)  # the threshold test writes an override into it
    srv = start(store, tmp_path_factory.mktemp("logs") / "console.log", api_keys=USER_KEY,
                admin_api_keys=ADMIN_KEY, max_queue_delay_ms=5)
    yield srv
    srv.stop()


# ---------------------------------------------------------------------- tests
def test_defective_image_shows_heatmap_and_boxes(console: Console, samples: dict[str, list[Path]],
                                                 demo_root: Path) -> None:
    hole = samples["hole"][0]
    with console.on_failure_screenshot():
        console.open()
        console.use_key(USER_KEY)
        console.wait_models()
        card = console.inspect(hole)
        assert card.get_attribute("data-heatmap-drawn") == "true"
        boxes = int(card.get_attribute("data-boxes-drawn"))
        assert boxes >= 1 and card.locator(".regions-count").inner_text() == str(boxes)
        assert card.locator(".verdict").inner_text() in ("ANOMALOUS", "NORMAL")
        assert "engine" in card.locator(".timings").inner_text()
        # the overlay canvas really holds the heatmap and the boxes (read back its pixels)
        painted = card.locator("canvas").evaluate(
            "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0, cyan = 0;"
            " for (let i = 0; i < d.length; i += 4) { if (d[i + 3]) n++;"
            " if (d[i] === 0 && d[i + 1] === 229 && d[i + 2] === 255 && d[i + 3] === 255) cyan++; }"
            " return {w: c.width, h: c.height, n, cyan}; }")
        assert painted["n"] > 0.9 * painted["w"] * painted["h"], painted  # the heatmap covers the image
        assert painted["cyan"] > 50, painted  # box outlines
        # ... and at least one box lies over the real defect
        regions = [Region(**g) for g in json.loads(card.get_attribute("data-regions-json"))]
        size = tuple(int(v) for v in card.get_attribute("data-image-size").split("x"))
        gt = np.asarray(Image.open(demo_root / CATEGORY / "ground_truth" / "hole" / f"{hole.stem}_mask.png")) > 0
        assert any((box_mask([r], size) & gt).any() for r in regions), (regions, size)
        # the photo under the canvas is displayed, at the canvas' size
        photo = card.locator(".viz img").bounding_box()
        overlay = card.locator(".viz canvas").bounding_box()
        assert photo and overlay and abs(photo["width"] - overlay["width"]) < 1.5
        assert abs(photo["height"] - overlay["height"]) < 1.5
        console.screenshot("inspected")
        # toggles redraw: no boxes when hidden
        console.page.uncheck("#show-boxes")
        assert card.get_attribute("data-boxes-drawn") == "0"
        console.page.check("#show-boxes")
        # the models page shows the serving version and its threshold
        console.tab("models")
        model = console.page.locator(f".model[data-category='{CATEGORY}']")
        model.wait_for()
        assert "onnxruntime" in model.inner_text()
        assert "(calibrated)" in model.locator(".effective-threshold").inner_text()
    assert not [line for line in console.log if line.startswith("pageerror")], console.log


def test_admin_threshold_change_flips_the_verdict(console: Console, server: Server,
                                                  samples: dict[str, list[Path]]) -> None:
    hole = samples["hole"][0]
    with console.on_failure_screenshot():
        console.open()
        console.use_key(ADMIN_KEY)  # an admin key is valid everywhere
        console.wait_models()
        first = console.inspect(hole)
        verdict = first.get_attribute("data-verdict")
        raw = float(first.get_attribute("data-raw-score"))
        model = httpx.get(f"{server.url}/v1/models/{CATEGORY}", headers={"X-API-Key": USER_KEY}).json()
        span = model["calibration"]["score_max"] - model["calibration"]["score_min"]
        new = raw + 1e-3 * span if verdict == "anomalous" else raw - 1e-3 * span

        console.tab("admin")
        console.page.wait_for_selector("#admin-effective")
        console.page.fill("#threshold-input", repr(new))
        summary = console.page.locator("#recent-summary[data-changed]")
        summary.wait_for()
        console.page.wait_for_selector("#recent-table tbody tr.changed")  # the preview marks our image
        assert int(summary.get_attribute("data-changed")) >= 1
        console.page.click("#threshold-apply")
        # A threshold at one defect's score lies far above every good part (the server's sane
        # range needs three recent images there): refused, then set once the operator confirms.
        console.page.wait_for_selector("#threshold-force:not([hidden])")
        assert "threshold_out_of_range" in console.page.inner_text("#error")
        console.page.click("#threshold-force")
        console.page.wait_for_selector("#admin-status[data-threshold]")
        assert console.page.is_hidden("#threshold-force")
        assert float(console.page.get_attribute("#admin-status", "data-threshold")) == pytest.approx(new)
        assert "override" in console.page.inner_text("#admin-status")
        console.screenshot("threshold")

        console.tab("inspect")
        second = console.inspect(hole)
        assert second.get_attribute("data-verdict") != verdict
        assert float(second.get_attribute("data-threshold")) == pytest.approx(new)
        assert first.get_attribute("data-verdict") == verdict  # earlier results stay as answered

        console.tab("admin")
        console.page.click("#threshold-reset")
        console.page.wait_for_selector("#admin-status:has-text('(calibrated)')")
    state = httpx.get(f"{server.url}/v1/models/{CATEGORY}/threshold", headers={"X-API-Key": USER_KEY}).json()
    assert state["override"] is None and state["threshold"] == state["calibrated_threshold"]


def test_wrong_or_missing_key_shows_an_error_not_a_blank_page(console: Console) -> None:
    page = console.page
    with console.on_failure_screenshot():
        console.open()
        error = page.locator("#error")
        error.wait_for()  # no key at all: the API answers 401 and the page says so
        assert "needs an API key" in error.inner_text()
        console.use_key("definitely-wrong")
        page.wait_for_selector("#key-status.bad")
        assert error.is_visible() and "rejected" in error.inner_text() and "invalid_api_key" in error.inner_text()
        assert page.locator("#drop").is_visible() and page.locator("header").is_visible()
        assert len(page.inner_text("body")) > 100
        console.screenshot("wrong-key")
        # a user key on the admin view: a visible "needs an admin key", not an empty view
        console.use_key(USER_KEY)
        page.wait_for_selector("#key-status.ok")
        assert not error.is_visible()
        console.tab("admin")
        page.wait_for_selector("#error:has-text('admin API key')")
        assert page.locator("#admin-info .failure").is_visible()


def test_build_progress_shows_until_the_model_arrives(browser: Any, artifacts: Path, model_store: Path,
                                                      tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    record_step(store, "quick", CATEGORY, "training", "12 sub-epochs")  # as scripts/build-demo.sh does
    srv = Server(store, tmp_path / "server.log", api_keys=USER_KEY, store_poll_s=0.3)
    console = Console(browser, srv, artifacts, "build-progress")
    try:
        with console.on_failure_screenshot():
            srv.wait_alive(60)
            console.open()
            console.use_key(USER_KEY)
            step = console.page.locator(f"#build li[data-category='{CATEGORY}']")
            step.wait_for()
            assert "quick: training (12 sub-epochs)" in step.inner_text()
            assert console.page.locator("#build").get_attribute("data-state") == "running"
            assert not console.page.locator("#error").is_visible()  # building is not an error
            (store / CATEGORY).mkdir()
            staging = store / CATEGORY / ".1-partial"
            shutil.copytree(model_store / CATEGORY / "1", staging)
            staging.rename(store / CATEGORY / "1")
            record_step(store, "quick", CATEGORY, "served", "quick model")
            console.page.wait_for_selector(f"#build li[data-category='{CATEGORY}']:has-text('served')")
            console.wait_models()  # the page polls while building: the category appears without a reload
            record_build(store, "done")
            console.page.wait_for_selector("#build", state="hidden")
    finally:
        console.close()
        srv.stop()


def test_the_console_finds_the_service_again_after_it_was_down(browser: Any, artifacts: Path, model_store: Path,
                                                               samples: dict[str, list[Path]], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart (a deploy, a crash) while the console was open: a view shown meanwhile emptied
    the category lists, and nothing asked again; the page stayed without categories, "cannot
    reach the service" on top, until the operator typed the key again or reloaded."""
    import harness

    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    srv = start(store, tmp_path / "server.log", api_keys=USER_KEY)
    console = Console(browser, srv, artifacts, "service-down")
    try:
        with console.on_failure_screenshot():
            console.open()
            console.use_key(USER_KEY)
            console.wait_models()
            srv.stop()
            console.tab("models")  # the model list asked for while the service is down
            console.page.wait_for_selector("#error:has-text('cannot reach the service')")
            assert console.page.locator(f"#category option[value='{CATEGORY}']").count() == 0
            console.screenshot("down")
            monkeypatch.setattr(harness, "free_port", lambda: srv.port)  # back on the page's port
            srv = start(store, tmp_path / "server-again.log", api_keys=USER_KEY)
            console.wait_models()  # asked again by itself: no key typed, no reload
            console.page.wait_for_selector("#error", state="hidden")
            console.page.wait_for_selector(f"article.model[data-category='{CATEGORY}']")
            console.tab("inspect")
            assert console.inspect(samples["good"][0]).get_attribute("data-verdict") in ("normal", "anomalous")
    finally:
        console.close()
        srv.stop()


def test_the_models_page_says_which_versions_and_categories_failed(browser: Any, artifacts: Path, model_store: Path,
                                                                 tmp_path: Path) -> None:
    """A newest version that cannot load (the service serves the one before) read
    "available 1, 2" as if both were fine, and a category with no version that loads was
    missing from the page: the reasons, in GET /v1/models, were never shown there."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    broken = store / CATEGORY / "2"
    shutil.copytree(store / CATEGORY / "1", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "version": "2"}))
    (broken / manifest["onnx"]["file"]).write_bytes(b"truncated")
    other = store / "grass" / "1"
    shutil.copytree(broken, other)
    (other / "manifest.json").write_text(json.dumps({**manifest, "version": "1", "category": "grass"}))
    srv = start(store, tmp_path / "server.log", api_keys=USER_KEY)
    console = Console(browser, srv, artifacts, "failed-versions")
    try:
        with console.on_failure_screenshot():
            console.open()
            console.use_key(USER_KEY)
            console.wait_models()
            console.tab("models")
            card = console.page.locator(f"article.model[data-category='{CATEGORY}']")
            failed = card.locator(".failed-versions")
            failed.wait_for()
            assert "2" in failed.inner_text() and "manifest says" in failed.inner_text(), failed.inner_text()
            assert card.get_attribute("data-failed-versions") == "2"
            missing = console.page.locator("article.model.failed[data-category='grass']")
            missing.wait_for()
            assert "not loaded" in missing.inner_text().lower() and "manifest says" in missing.inner_text()
            console.screenshot("failed")
    finally:
        console.close()
        srv.stop()


# ---------------------------------------------------------------------- the Review page


@pytest.fixture(scope="module")
def review_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Every answer kept (audit rate 1), so the queue holds what the test inspects."""
    root = tmp_path_factory.mktemp("review-console")
    srv = start_review_server(model_store, root)
    yield srv
    srv.stop()


def test_review_page_labels_with_the_keyboard_and_counts_agreement(browser: Any, review_server: Server,
                                                                   artifacts: Path,
                                                                   samples: dict[str, list[Path]]) -> None:
    from harness import metric, upload, wait_for_metric

    user = httpx.Client(base_url=review_server.url, headers={"X-API-Key": USER_KEY}, timeout=30.0)
    reviewer = {"X-API-Key": REVIEWER_KEY}
    images = [samples["good"][0], samples["hole"][0], samples["good"][1]]
    results = []
    for path in images:
        r = user.post(f"/v1/inspect/{CATEGORY}?heatmap=none", files=[upload(f"{path.parent.name}-{path.name}",
                                                                            path.read_bytes())])
        assert r.status_code == 200, r.text
        results.append(r.json()["results"][0])
    wait_for_metric(user, "msflow_review_captures_total", 3, timeout=30, category=CATEGORY, outcome="stored")
    queue = httpx.get(f"{review_server.url}/v1/review/{CATEGORY}/items", headers=reviewer).json()["items"]
    assert [e["item"]["filename"] for e in queue] == [r["filename"] for r in results]  # oldest first
    console = Console(browser, review_server, artifacts, "review")
    try:
        with console.on_failure_screenshot():
            page = console.page
            console.open()
            console.use_key(REVIEWER_KEY)  # a reviewer key also lists the models
            console.wait_models()
            console.tab("review")
            page.select_option("#review-verdict", "")  # all pending, not only review verdicts
            page.wait_for_selector("#review-items[data-loaded='3']")
            page.wait_for_selector(".review-item.current[data-heatmap-drawn='true']")
            stats = page.locator("#review-stats")
            assert stats.get_attribute("data-labelled") == "0" and stats.get_attribute("data-pending") == "3"
            first = page.locator(".review-item").first
            assert first.get_attribute("data-id") == queue[0]["item"]["id"] and "current" in first.get_attribute("class")
            assert int(first.get_attribute("data-boxes-drawn")) == len(queue[0]["item"]["regions"])
            console.screenshot("review")

            page.keyboard.press("o")  # the good part: OK
            page.wait_for_selector("#review-stats[data-labelled='1']")
            page.fill("#review-defect", "hole")
            page.locator("body").click(position={"x": 5, "y": 5})  # leave the text field: keys label again
            page.keyboard.press("n")  # the hole: NG
            page.wait_for_selector("#review-stats[data-labelled='2']")
            assert page.locator(".review-item").count() == 1
            assert page.locator(".review-item").first.get_attribute("data-id") == queue[2]["item"]["id"]
            assert stats.get_attribute("data-pending") == "1"
            # agreement: the model's call (score >= threshold) against the operator's label
            agree = (not results[0]["is_anomalous"]) + results[1]["is_anomalous"]
            assert stats.get_attribute("data-agree") == str(agree)
            assert stats.get_attribute("data-fp") == str(int(results[0]["is_anomalous"]))
            assert stats.get_attribute("data-fn") == str(int(not results[1]["is_anomalous"]))
            assert f"agreement: {agree} of 2" in stats.inner_text()
            page.keyboard.press("k")  # moving past the ends stays on the last item
            assert "current" in page.locator(".review-item").first.get_attribute("class")
            console.screenshot("review-labelled")
        labels = [httpx.get(f"{review_server.url}/v1/review/{CATEGORY}/items/{e['item']['id']}",
                            headers=reviewer).json()["label"] for e in queue]
        assert [(lab["label"], lab["by"]) for lab in labels[:2]] == [("ok", "rita"), ("ng", "rita")]
        assert labels[1]["defect_type"] == "hole" and labels[2] is None
        assert metric(user, "msflow_review_labels", category=CATEGORY, label="ng") == 1
    finally:
        console.close()
        user.close()
    assert not [line for line in console.log if line.startswith("pageerror")], console.log
