"""The operator console's browser tests' shared parts (``test_console_browser``,
``test_console_review_browser``, ``test_console_layout_browser``): a real headless Chromium
(Debian's ``chromium`` package, see ``scripts/install-browser.sh``) driven by Playwright, the
:class:`Console` driver of one browser context on the console page, and their fixtures. Test
modules import this, never each other. Without Playwright or Chromium a module importing it is
skipped (failed under CI, which installs both: :func:`harness.missing`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, missing, start

try:
    from playwright import sync_api
except ImportError:
    missing("pip install playwright (the test extra)", allow_module_level=True)

CHROMIUM = os.environ.get("MSFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # two shared cores: a cold inspection can take seconds

if not Path(CHROMIUM).is_file():
    missing(f"no Chromium at {CHROMIUM}: run scripts/install-browser.sh", allow_module_level=True)

REVIEWER_KEY = "reviewer-key-browser"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("MSFLOW_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("console-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Console:
    """One browser context (its own sessionStorage) on the console page, with its console log."""

    def __init__(self, browser: Any, server: Server, artifacts: Path, name: str) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.log: list[str] = []
        self.page.on("console", lambda m: self.log.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.log.append(f"pageerror: {e}"))
        self.server = server
        self.artifacts = artifacts
        self.name = name

    def open(self) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("body[data-ready='1']")

    def use_key(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#key-save")

    def wait_models(self) -> None:
        self.page.wait_for_selector(f"#category option[value='{CATEGORY}']", state="attached")

    def inspect(self, path: Path) -> Any:
        """Upload one image; returns the locator of its finished card (the newest, first)."""
        done_before = self.page.locator(".card[data-state=done]").count()
        self.page.set_input_files("#files", str(path))
        self.page.locator(".card[data-state=done]").nth(done_before).wait_for()
        newest = self.page.locator(".card").first  # cards are prepended
        assert newest.get_attribute("data-state") == "done"
        return self.page.locator(f".card[data-seq='{newest.get_attribute('data-seq')}']")  # stays on this card

    def tab(self, view: str) -> None:
        self.page.click(f"button.tab[data-view={view}]")

    def screenshot(self, label: str) -> Path:
        path = self.artifacts / f"{self.name}-{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    @contextmanager
    def on_failure_screenshot(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            try:
                shot = f"screenshot: {self.screenshot('failure')}"
            except Exception as shot_exc:  # the browser itself may be gone
                shot = f"no screenshot ({shot_exc})"
            log = "\n".join(self.log[-30:]) or "(empty)"
            raise AssertionError(f"{type(exc).__name__}: {exc}\n{shot}\nartifacts: {self.artifacts}\n"
                                 f"browser console:\n{log}") from exc

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser: Any, server: Server, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Console]:
    """A page on the module's ``server`` fixture (a module names its own server so), closed after."""
    c = Console(browser, server, artifacts, request.node.name)
    yield c
    c.close()


@pytest.fixture(scope="module")
def samples(demo_test_images: dict[str, list[Path]]) -> dict[str, list[Path]]:
    return demo_test_images


def start_review_server(model_store: Path, root: Path) -> Server:
    """A console server under ``root`` that keeps every answer for review (audit rate 1), on a
    copy of ``model_store`` without another test's review items; the reviewer's key is
    :data:`REVIEWER_KEY`."""
    shutil.copytree(model_store, root / "store", ignore=shutil.ignore_patterns(".review"))
    return start(root / "store", root / "server.log", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                 reviewer_api_keys=f"rita={REVIEWER_KEY}", review_store=str(root / "review"), review_audit_rate=1.0)
