"""Where the console's layout failed an operator, in a real headless Chromium against a real
``msflow serve`` (the browser, the ``Console`` driver and their fixtures:
console_fixtures.py):

* a keyboard user tabbing to "choose files": the focus went to the file field, kept
  invisible (1 pixel, transparent) inside the drop zone, and nothing on the page showed it;
* a very tall part (256x2048): its card, in Inspect and in Review, grew to several screens,
  the photo and its overlay 3-4 times the window's height; a very wide one stays in its card.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, upload, wait_until

from console_fixtures import REVIEWER_KEY, Console, artifacts, browser, samples, start_review_server  # noqa: F401  (fixtures)

VIEWPORT_HEIGHT = 1000  # Console's viewport
SHAPES = {"tall": (256, 2048), "wide": (2048, 256)}

# What the focused element looks like, and whether an ancestor draws the ring for it.
FOCUS_PROBE = """() => {
  const a = document.activeElement;
  const ring = (n) => { const s = getComputedStyle(n); return s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0; };
  let opacity = 1;
  for (let n = a; n; n = n.parentElement) opacity *= Number(getComputedStyle(n).opacity);
  const r = a.getBoundingClientRect();
  let around = null;
  for (let n = a.parentElement; n && n !== document.body; n = n.parentElement) if (ring(n)) { around = n.id || n.className; break; }
  return {id: a.id, tag: a.tagName, text: (a.textContent || '').trim().slice(0, 20), ring: ring(a), opacity,
          width: r.width, height: r.height, around};
}"""


@pytest.fixture(scope="module")
def shapes_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory,
                  samples: dict[str, list[Path]]) -> Iterator[Server]:
    """Every answer kept (audit rate 1), with a tall and a wide part already in the queue."""
    root = tmp_path_factory.mktemp("console-layout")
    srv = start_review_server(model_store, root)
    try:
        for name, path in shaped(samples, root).items():
            r = httpx.post(f"{srv.url}/v1/inspect/{CATEGORY}?heatmap=none", files=[upload(f"{name}.png", path.read_bytes())],
                           headers={"X-API-Key": USER_KEY}, timeout=120.0)
            assert r.status_code == 200, r.text
        wait_until(lambda: len(httpx.get(f"{srv.url}/v1/review/{CATEGORY}/items",
                                         headers={"X-API-Key": REVIEWER_KEY}).json()["items"]) == len(SHAPES),
                   60, "the tall and the wide part in the review queue")
        yield srv
    finally:
        srv.stop()


def shaped(samples: dict[str, list[Path]], where: Path) -> dict[str, Path]:
    out = {}
    for name, size in SHAPES.items():
        out[name] = where / f"{name}.png"
        Image.open(samples["hole"][0]).convert("RGB").resize(size).save(out[name])
    return out


@pytest.fixture
def console(browser: Any, shapes_server: Server, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Console]:
    c = Console(browser, shapes_server, artifacts, request.node.name)
    yield c
    c.close()
    assert not [line for line in c.log if line.startswith("pageerror")], c.log


def box(locator: Any) -> dict[str, float]:
    b = locator.bounding_box()
    assert b, locator
    return b


def assert_fits(frame: Any, container: Any, size: tuple[int, int], what: str) -> None:
    """The photo frame keeps the image's proportions, its overlay covers it exactly, and both
    stay inside their card and within the window's height."""
    viz, card = box(frame), box(container)
    overlay = box(frame.locator("canvas"))
    ratio = size[0] / size[1]
    assert viz["width"] / viz["height"] == pytest.approx(ratio, rel=0.03), (what, viz)
    assert overlay["width"] == pytest.approx(viz["width"], abs=1.5) and overlay["height"] == pytest.approx(viz["height"], abs=1.5)
    assert viz["height"] <= 0.9 * VIEWPORT_HEIGHT, (what, viz)
    assert viz["x"] >= card["x"] - 0.5 and viz["x"] + viz["width"] <= card["x"] + card["width"] + 0.5, (what, viz, card)
    assert viz["y"] + viz["height"] <= card["y"] + card["height"] + 0.5, (what, viz, card)
    photo = frame.locator("img")
    if photo.is_visible():  # the photo under the overlay, at its size: no stretch either way
        p = box(photo)
        assert p["width"] == pytest.approx(viz["width"], abs=1.5) and p["height"] == pytest.approx(viz["height"], abs=1.5)


def test_tall_and_wide_parts_keep_their_shape_inside_the_card(console: Console, samples: dict[str, list[Path]],
                                                              tmp_path: Path) -> None:
    files = shaped(samples, tmp_path)
    with console.on_failure_screenshot():
        console.open()
        console.use_key(USER_KEY)
        console.wait_models()
        for name, path in files.items():
            card = console.inspect(path)
            assert card.get_attribute("data-image-size") == "x".join(map(str, SHAPES[name]))
            assert card.get_attribute("data-heatmap-drawn") == "true"
            assert_fits(card.locator(".viz"), card, SHAPES[name], f"inspect {name}")
        console.screenshot("inspect-shapes")

        console.use_key(REVIEWER_KEY)
        console.tab("review")
        console.page.select_option("#review-verdict", "")
        console.page.wait_for_selector(f"#review-items[data-loaded='{len(SHAPES)}']")
        for name in SHAPES:
            item = console.page.locator(f".review-item:has(h3:text-is('{name}.png'))")
            item.locator("xpath=self::*[@data-boxes-drawn]").wait_for()
            assert_fits(item.locator(".viz"), item, SHAPES[name], f"review {name}")
        console.screenshot("review-shapes")


def test_every_control_reached_with_tab_shows_its_focus(console: Console) -> None:
    page = console.page
    with console.on_failure_screenshot():
        console.open()
        console.use_key(USER_KEY)
        console.wait_models()
        page.locator("body").click(position={"x": 5, "y": 5})
        seen, unseen = [], []
        for _ in range(14):  # the header, the error box's close, the Inspect toolbar, the file field
            page.keyboard.press("Tab")
            f = page.evaluate(FOCUS_PROBE)
            if f["tag"] == "BODY":
                break
            visible = f["opacity"] > 0 and f["width"] > 2 and f["height"] > 2
            (seen if (f["ring"] and visible) or f["around"] else unseen).append(f)
        assert any(f["id"] == "files" for f in seen + unseen), seen + unseen
        assert not unseen, unseen


PHONE = {"width": 375, "height": 740}


def test_a_phone_wide_window_scrolls_no_view_sideways(console: Console, samples: dict[str, list[Path]]) -> None:
    """At 375 pixels the key form ran 155 pixels past the window's edge ("Forget" and the key's
    status off screen, the whole page scrolling sideways), and the Admin page's table of recent
    scores past it too."""
    page = console.page
    page.set_viewport_size(PHONE)
    with console.on_failure_screenshot():
        console.open()
        console.use_key(ADMIN_KEY)  # every view answers an admin key
        console.wait_models()
        console.inspect(samples["hole"][0])
        waits = {"inspect": ".card[data-state=done]", "review": ".review-item[data-boxes-drawn]",
                 "models": "article.model", "admin": "#recent-table tbody tr"}
        for view, ready in waits.items():
            console.tab(view)
            if view == "review":
                page.select_option("#review-verdict", "")  # the audit samples: every part here is ok or ng
            page.wait_for_selector(ready)
            console.screenshot(f"phone-{view}")
            wide = page.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= PHONE["width"], (view, wide)
            for control in ("#key-save", "#key-forget", "#key-status", f"button.tab[data-view={view}]"):
                b = box(page.locator(control))
                assert b["x"] >= 0 and b["x"] + b["width"] <= PHONE["width"], (view, control, b)
