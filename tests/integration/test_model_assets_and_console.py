"""What the real ``msflow serve`` of ``served_model_fixtures`` serves besides answers: a
version's whitelisted assets (never its manifest, model or override, nothing outside its
folder), and the console's page and static files without any other origin."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
from PIL import Image

from harness import CATEGORY, Server, assert_error
from served_model_fixtures import client, server  # noqa: F401  (fixtures)
from service.pipeline.thresholds import OVERRIDE_FILE


def test_model_assets_whitelist(client: httpx.Client, server: Server, module_store: Path) -> None:
    version_dir = module_store / CATEGORY / "1"
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    (version_dir / "roc.png").write_bytes(png.getvalue())
    (version_dir / "report.json").write_text(json.dumps({"image_auroc": 0.5}))
    try:
        assert client.get(f"/v1/models/{CATEGORY}").json()["assets"] == ["roc.png", "report.json"]
        r = client.get(f"/v1/models/{CATEGORY}/assets/roc.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == png.getvalue()
        r = client.get(f"/v1/models/{CATEGORY}/assets/report.json")
        assert r.status_code == 200 and r.json() == {"image_auroc": 0.5}
        assert_error(client.get(f"/v1/models/{CATEGORY}/assets/examples.png"), 404, "asset_not_found")
        for name in ("manifest.json", "model.onnx", OVERRIDE_FILE):
            assert_error(client.get(f"/v1/models/{CATEGORY}/assets/{name}"), 404, "asset_not_found")
        assert client.get(f"/v1/models/{CATEGORY}/assets/..%2Fmanifest.json").status_code == 404
        assert client.get(f"/v1/models/{CATEGORY}/assets/%2E%2E/1/manifest.json").status_code == 404
        assert_error(client.get("/v1/models/metal/assets/roc.png"), 404, "unknown_category")
        assert_error(httpx.get(f"{server.url}/v1/models/{CATEGORY}/assets/roc.png"), 401, "missing_api_key")
    finally:
        (version_dir / "roc.png").unlink()
        (version_dir / "report.json").unlink()


def test_console_is_served_without_network(server: Server) -> None:
    page = httpx.get(f"{server.url}/")  # no key needed: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    for asset, kind in (("/static/console.js", "javascript"), ("/static/console.css", "text/css")):
        r = httpx.get(f"{server.url}{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert not re.search(r"https?://", r.text), f"{asset} refers to another origin"
    assert not re.search(r"(src|href)=\"https?://", page.text)
    assert httpx.get(f"{server.url}/static/nope.js").status_code == 404
