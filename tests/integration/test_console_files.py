"""The console's files as the page names them: one shared core (console.js) and a file per
view, each served from ``/static`` like the others (its type, no other origin, cacheable,
no sniffing) and shipped in the wheel (pyproject's package data), so that a file added to
the page and forgotten in either place fails here rather than in an operator's browser."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import USER_KEY, Server, served

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "static"


@pytest.fixture(scope="module")
def server(module_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(module_store, tmp_path_factory.mktemp("logs") / "console-files.log", api_keys=USER_KEY) as srv:
        yield srv


def page_assets(html: str) -> tuple[list[str], list[str]]:
    scripts = re.findall(r"<script\b[^>]*\bsrc=\"([^\"]+)\"[^>]*>", html)
    styles = re.findall(r"<link\b[^>]*\brel=\"stylesheet\"[^>]*\bhref=\"([^\"]+)\"", html)
    return scripts, styles


def test_every_file_the_page_names_is_served_deferred_in_order(server: Server) -> None:
    html = httpx.get(f"{server.url}/").text
    scripts, styles = page_assets(html)
    assert scripts[0] == "/static/console.js"  # the core first: the views read window.msflowConsole
    assert {"/static/inspect.js", "/static/review.js", "/static/models-view.js", "/static/admin.js"} <= set(scripts)
    assert len(re.findall(r"<script\b[^>]*\bdefer\b", html)) == len(scripts)  # defer runs them in order
    assert "<script>" not in html  # nothing inline: the policy would block it
    for path, kind in [(s, "javascript") for s in scripts] + [(s, "text/css") for s in styles]:
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
        assert not re.search(r"https?://", r.text), f"{path} refers to another origin"
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert "no-store" not in r.headers.get("cache-control", ""), path
        assert r.headers.get("etag") and r.headers.get("last-modified"), path  # revalidated, not refetched
    served = {f"/static/{p.name}" for p in STATIC.iterdir() if p.suffix in (".js", ".css")}
    assert served == set(scripts) | set(styles)  # no file left behind, none the page forgot


def test_the_wheel_ships_every_console_file() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["service"]
    for path in STATIC.iterdir():
        relative = path.relative_to(REPO / "service").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in the package data"


def test_every_console_script_stays_small() -> None:
    """One file per view: the console's script had grown to 709 lines of four concepts."""
    for path in STATIC.glob("*.js"):
        lines = path.read_text().count("\n")
        assert lines <= 420, f"{path.name}: {lines} lines"
