"""The console's Review and Inspect pages where an operator met a wall, in a real headless
Chromium against a real ``msflow serve`` (the browser, the ``Console`` driver and their
fixtures: console_fixtures.py):

* a queue longer than one page (20): only the first 20 items were ever reachable, J stopped
  at the 20th and nothing said more were pending;
* a label given by mistake: the item left the list and the console could not correct it;
* a defect type the server refuses ("Big Crack"): a 422 quoting a regular expression;
* a user key on the Review page: "needs an admin API key", where a reviewer's key works;
* a TIFF (the service reads it, Chromium cannot show it): the photo collapsed to a 16-pixel
  strip with the heatmap and the boxes squashed into it;
* J past the last item while the next page was on its way: the selection waited for every
  photo of that page, then jumped back to the first new item from wherever the operator
  had moved meanwhile;
* two operators on one queue: the second one's label silently replaced the first one's
  (the list on their screen still showed the item pending), the console said only
  "Labelled ... NG".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, png_variant, upload, wait_until

from console_fixtures import REVIEWER_KEY, Console, artifacts, browser, samples, start_review_server  # noqa: F401  (fixtures)

QUEUED = 23  # more than the console's page of 20


@pytest.fixture(scope="module")
def queue_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory,
                 samples: dict[str, list[Path]]) -> Iterator[Server]:
    """Every answer kept (audit rate 1), and QUEUED images already in the queue."""
    root = tmp_path_factory.mktemp("review-pages")
    srv = start_review_server(model_store, root)
    try:
        good = samples["good"][0]
        files = [upload(f"part-{i:02d}.png", png_variant(good, str(i))) for i in range(QUEUED)]  # no cache hits
        r = httpx.post(f"{srv.url}/v1/inspect/{CATEGORY}?heatmap=none", files=files,
                       headers={"X-API-Key": USER_KEY}, timeout=120.0)
        assert r.status_code == 200, r.text
        wait_until(lambda: pending(srv) == QUEUED, 60, f"{QUEUED} items in the review queue")
        yield srv
    finally:
        srv.stop()


def pending(srv: Server) -> int:
    stats = httpx.get(f"{srv.url}/v1/review/{CATEGORY}/stats", headers={"X-API-Key": REVIEWER_KEY}).json()
    return sum(stats["pending"].values())


def label_of(srv: Server, item_id: str) -> dict[str, Any] | None:
    return httpx.get(f"{srv.url}/v1/review/{CATEGORY}/items/{item_id}",
                     headers={"X-API-Key": REVIEWER_KEY}).json()["label"]


@pytest.fixture
def reviewer(browser: Any, queue_server: Server, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Console]:
    c = Console(browser, queue_server, artifacts, request.node.name)
    c.open()
    c.use_key(REVIEWER_KEY)
    c.wait_models()
    c.tab("review")
    c.page.select_option("#review-verdict", "")  # every pending item, audit samples included
    yield c
    c.close()
    assert not [line for line in c.log if line.startswith("pageerror")], c.log


def test_the_queue_past_the_first_page_is_reachable(reviewer: Console, queue_server: Server) -> None:
    page = reviewer.page
    total = pending(queue_server)
    assert total > 20
    with reviewer.on_failure_screenshot():
        page.wait_for_selector("#review-items[data-loaded='20']")
        assert page.locator("#review-shown").inner_text() == f"Showing 20 of {total} pending"
        assert page.locator("#review-more").is_visible()
        for _ in range(19):
            page.keyboard.press("j")
        assert "current" in page.locator(".review-item").nth(19).get_attribute("class")
        page.keyboard.press("j")  # past the last one listed: the next page comes, and the 21st is current
        page.wait_for_selector(f"#review-items[data-loaded='{total}']")
        page.wait_for_selector(".review-item:nth-child(21).current")
        assert page.locator("#review-more").is_hidden()  # nothing further
        assert len(set(page.locator(".review-item").evaluate_all("ns => ns.map(n => n.dataset.id)"))) == total
        assert page.locator("#review-shown").inner_text() == f"Showing {total} of {total} pending"


def test_j_while_the_next_page_comes_moves_one_item_and_the_selection_stays_where_the_operator_is(
        reviewer: Console, queue_server: Server) -> None:
    page = reviewer.page
    held_pages: list[Any] = []
    held_photos: list[Any] = []
    photos = re.compile(r"/items/[^/?]+/(image|heatmap\.png)$")
    page.route(re.compile(r"/items\?.*after="), lambda route: held_pages.append(route))  # the next page, held
    with reviewer.on_failure_screenshot():
        total = pending(queue_server)
        page.wait_for_selector("#review-items[data-loaded='20']")
        page.wait_for_selector(".review-item:nth-child(20)[data-boxes-drawn]")
        page.route(photos, lambda route: held_photos.append(route))  # from here: the next page's photos, held
        for _ in range(19):
            page.keyboard.press("j")
        for _ in range(3):  # past the last one listed, and twice more while that page is on its way
            page.keyboard.press("j")
        while not held_pages:
            page.wait_for_timeout(50)
        page.wait_for_timeout(300)
        assert len(held_pages) == 1  # one fetch for the three presses
        assert "current" in page.locator(".review-item").nth(19).get_attribute("class")
        held_pages[0].continue_()
        page.wait_for_selector(f"#review-items[data-loaded='{total}']")
        # the 21st is current as soon as it is listed, its photo or not: one step for the three presses
        page.wait_for_selector(".review-item:nth-child(21).current", timeout=5_000)
        page.keyboard.press("j")  # the operator moves on while the photos still come
        assert "current" in page.locator(".review-item").nth(21).get_attribute("class")
        page.unroute(photos)
        for route in held_photos:
            route.continue_()
        for i in range(21, total + 1):
            page.wait_for_selector(f".review-item:nth-child({i})[data-boxes-drawn]")
        page.wait_for_timeout(300)
        assert page.locator(".review-item.current").count() == 1
        assert "current" in page.locator(".review-item").nth(21).get_attribute("class")  # not pulled back
        ids = page.locator(".review-item").evaluate_all("ns => ns.map(n => n.dataset.id)")
        assert len(ids) == len(set(ids)) == total



def test_a_list_reloaded_while_its_next_page_comes_fetches_its_own(reviewer: Console, queue_server: Server) -> None:
    """Refresh while the next page of the list before was on its way: J past the last item of
    the new list reused that fetch, which the reload had made moot, and did nothing."""
    page = reviewer.page
    held_pages: list[Any] = []
    page.route(re.compile(r"/items\?.*after="), lambda route: held_pages.append(route))
    with reviewer.on_failure_screenshot():
        total = pending(queue_server)
        page.wait_for_selector("#review-items[data-loaded='20']")
        for _ in range(20):  # past the last one listed: the next page is asked for, and held
            page.keyboard.press("j")
        while not held_pages:
            page.wait_for_timeout(50)
        page.click("#review-refresh")
        page.wait_for_selector(".review-item:nth-child(1).current")
        page.wait_for_selector("#review-items[data-loaded='20']")
        page.locator("body").click(position={"x": 5, "y": 5})
        for _ in range(20):
            page.keyboard.press("j")
        for _ in range(40):
            if len(held_pages) == 2:
                break
            page.wait_for_timeout(50)
        assert len(held_pages) == 2  # the new list's own fetch
        for route in held_pages:  # the list before's comes back too, and is dropped
            route.continue_()
        page.wait_for_selector(f"#review-items[data-loaded='{total}']")
        page.wait_for_selector(".review-item:nth-child(21).current")
        ids = page.locator(".review-item").evaluate_all("ns => ns.map(n => n.dataset.id)")
        assert len(ids) == len(set(ids)) == total

def test_a_wrong_label_is_corrected_and_a_bad_defect_type_explained(reviewer: Console, queue_server: Server) -> None:
    page = reviewer.page
    stats = page.locator("#review-stats")
    with reviewer.on_failure_screenshot():
        page.wait_for_selector("#review-items[data-loaded='20']")
        labelled = int(stats.get_attribute("data-labelled"))
        first = page.locator(".review-item.current").get_attribute("data-id")
        page.fill("#review-defect", "Big Crack")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("n")
        error = page.locator("#error")
        error.wait_for()
        assert "lower-case letters, digits, _ and -" in error.inner_text() and "big-crack" in error.inner_text()
        assert "pattern" not in error.inner_text()  # not the server's regular expression
        assert label_of(queue_server, first) is None and stats.get_attribute("data-labelled") == str(labelled)

        page.fill("#review-defect", "crack")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("o")  # the slip: this part is cracked
        last = page.locator(f"#review-last[data-id='{first}'][data-label='ok']")
        last.wait_for()
        assert label_of(queue_server, first)["label"] == "ok"
        page.click("#review-last button.relabel")
        page.wait_for_selector(f"#review-last[data-id='{first}'][data-label='ng']")
        lab = label_of(queue_server, first)
        assert (lab["label"], lab["defect_type"], lab["by"]) == ("ng", "crack", "rita")
        assert stats.get_attribute("data-labelled") == str(labelled + 1)  # a relabel, not a second label
        assert "NG (crack)" in page.locator("#review-last").inner_text()


def test_a_user_key_on_the_review_page_is_told_which_key_works(console: Console) -> None:
    page = console.page
    with console.on_failure_screenshot():
        console.open()
        console.use_key(USER_KEY)
        console.wait_models()
        console.tab("review")
        page.wait_for_selector("#error:has-text('forbidden')")
        text = page.locator("#error").inner_text()
        assert "reviewer or admin API key" in text and "needs an admin API key" not in text


@pytest.fixture
def console(browser: Any, queue_server: Server, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Console]:
    c = Console(browser, queue_server, artifacts, request.node.name)
    yield c
    c.close()


def test_a_photo_the_browser_cannot_show_keeps_the_overlay(console: Console, samples: dict[str, list[Path]],
                                                          tmp_path: Path) -> None:
    tiff = tmp_path / "hole-wide.tiff"  # Chromium shows no TIFF; the service decodes it
    Image.open(samples["hole"][0]).convert("RGB").resize((256, 128)).save(tiff)
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"not an image")
    with console.on_failure_screenshot():
        console.open()
        console.use_key(USER_KEY)
        console.wait_models()
        card = console.inspect(tiff)
        viz = card.locator(".viz").bounding_box()
        overlay = card.locator(".viz canvas").bounding_box()
        assert viz and overlay and viz["width"] / viz["height"] == pytest.approx(2.0, rel=0.02), viz
        assert overlay["height"] == pytest.approx(viz["height"], abs=1.5)
        assert card.get_attribute("data-heatmap-drawn") == "true"
        assert "cannot display the image itself" in card.locator(".no-photo").inner_text()
        console.screenshot("tiff")

        console.page.set_input_files("#files", str(junk))
        failed = console.page.locator(".card[data-state=error]").first
        failed.wait_for()
        assert "unsupported_media_type" in failed.inner_text()
        assert failed.locator(".viz").is_hidden()  # no broken-photo strip


def test_a_label_over_another_operators_says_whose_it_replaced(reviewer: Console, browser: Any, queue_server: Server,
                                                                artifacts: Path) -> None:
    other = Console(browser, queue_server, artifacts, "review-other-operator")
    try:
        with reviewer.on_failure_screenshot(), other.on_failure_screenshot():
            reviewer.page.wait_for_selector(".review-item.current[data-heatmap-drawn]")
            item = reviewer.page.locator(".review-item.current").get_attribute("data-id")
            other.open()
            other.use_key(ADMIN_KEY)
            other.wait_models()
            other.tab("review")
            other.page.select_option("#review-verdict", "")
            other.page.wait_for_selector(f".review-item.current[data-id='{item}']")  # both see it pending

            reviewer.page.locator("body").click(position={"x": 5, "y": 5})
            reviewer.page.keyboard.press("o")
            reviewer.page.wait_for_selector(f"#review-last[data-id='{item}'][data-label='ok']")
            assert reviewer.page.locator("#review-last .replaced").count() == 0  # nobody's label replaced

            other.page.locator("body").click(position={"x": 5, "y": 5})
            other.page.keyboard.press("n")  # the other operator's screen still shows it pending
            warning = other.page.locator(f"#review-last[data-id='{item}'][data-label='ng'] .replaced")
            warning.wait_for()
            text = warning.inner_text()
            assert "replaced" in text and "OK" in text and "rita" in text, text
            other.screenshot("replaced")
            # the earlier label is one click away: the button puts it back
            other.page.click("#review-last button.relabel")
            other.page.wait_for_selector(f"#review-last[data-id='{item}'][data-label='ok']")
            assert other.page.locator("#review-last .replaced").count() == 0  # its own label, nobody else's
        assert label_of(queue_server, item)["label"] == "ok"
    finally:
        other.close()
