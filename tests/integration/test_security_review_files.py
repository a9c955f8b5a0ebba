"""The review routes that serve files, attacked on a real ``msflow serve`` (null engine, a
hand-written version): the files they may serve are those of the item's own folder in the
review store, whatever its ``item.json`` says and whatever links the shared volume holds."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.review_store import Budget, ReviewStore
from harness import CATEGORY, Server, assert_error, client_for, fake_version, start

REVIEWER_KEY = "reviewer-key-sec"
SECRET = b"outside the review store\n"
HTML = b"<script>fetch('/x?k=' + sessionStorage.getItem('msflow.apiKey'))</script>"


def _fields() -> dict[str, Any]:
    return {"reason": "review", "model_version": "1", "engine": "null", "filename": "a.png", "verdict": "review",
            "is_anomalous": True, "raw_score": 1.5, "score": 0.55, "threshold": 1.0, "ng_threshold": 2.0}


def _add(store: ReviewStore, image: bytes, second: int) -> str:
    outcome, item_id = store.add(CATEGORY, _fields(), image, "PNG", (8, 8), b"heat", (8, 8),
                                 now=datetime.now(timezone.utc) - timedelta(seconds=60 - second))
    assert outcome == "stored" and item_id
    return item_id


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, dict[str, str]]]:
    """A server whose review store holds an honest item and three that reach outside it."""
    root = tmp_path_factory.mktemp("security-review")
    store_dir = root / "store"
    fake_version(store_dir, CATEGORY)
    (root / "secret.txt").write_bytes(SECRET)
    review = ReviewStore(store_dir / ".review", Budget(max_bytes=10**8, max_items=100, retention_s=10**9,
                                                      label_retention_s=10**9))
    ids = {name: _add(review, f"image {name}".encode(), i)
           for i, name in enumerate(("honest", "named", "linked", "heat", "html"))}
    for item_id in ids.values():  # labelled while honest: a label is refused to an item whose image is not its own
        review.label(CATEGORY, item_id, "ng", by="alice", defect_type="crack")
    items = store_dir / ".review" / CATEGORY / "items"
    # item.json naming a file outside the folder (written by anyone who can write the volume)
    record = json.loads((items / ids["named"] / "item.json").read_text())
    record["image"]["file"] = "../../../../../secret.txt"  # <root>/secret.txt
    (items / ids["named"] / "item.json").write_text(json.dumps(record))
    # the image replaced by a symlink to a file outside the store
    (items / ids["linked"] / "image.png").unlink()
    (items / ids["linked"] / "image.png").symlink_to(root / "secret.txt")
    # an HTML page kept as the image, item.json saying it is HTML
    record = json.loads((items / ids["html"] / "item.json").read_text())
    record["image"]["media_type"] = "text/html"
    record["image"]["bytes"] = len(HTML)  # its own size: one cut short is a damaged item (a 404)
    (items / ids["html"] / "item.json").write_text(json.dumps(record))
    (items / ids["html"] / "image.png").write_bytes(HTML)
    (items / ids["heat"] / "heatmap.png").unlink()
    (items / ids["heat"] / "heatmap.png").symlink_to(root / "secret.txt")
    server = start(store_dir, root / "server.log", engine="null", reviewer_api_keys={"alice": REVIEWER_KEY})
    try:
        yield server, root, ids
    finally:
        server.stop()


def _get(setup: tuple[Server, Path, dict[str, str]], path: str) -> httpx.Response:
    with client_for(setup[0], REVIEWER_KEY) as client:
        return client.get(f"/v1/review/{CATEGORY}/{path}")


def test_honest_item_is_served(setup: tuple[Server, Path, dict[str, str]]) -> None:
    ids = setup[2]
    assert _get(setup, f"items/{ids['honest']}/image").content == b"image honest"
    assert _get(setup, f"items/{ids['honest']}/heatmap.png").content == b"heat"


@pytest.mark.parametrize("which,path", [("named", "image"), ("linked", "image"), ("heat", "heatmap.png")])
def test_no_file_outside_the_item_folder_is_served(setup: tuple[Server, Path, dict[str, str]], which: str,
                                                  path: str) -> None:
    r = _get(setup, f"items/{setup[2][which]}/{path}")
    assert SECRET not in r.content
    assert_error(r, 404, "review_item_not_found")
    assert str(setup[1]) not in r.text  # the refusal names no server path


def test_an_image_is_never_served_as_a_page(setup: tuple[Server, Path, dict[str, str]]) -> None:
    """The image's media type is read from item.json, on the shared volume: "text/html" there
    made the route answer an HTML page of this origin, the console's (200 text/html before),
    whose script could read the key the console keeps. An image is served as an image type
    the store writes, anything else as bytes to download."""
    r = _get(setup, f"items/{setup[2]['html']}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", r.headers
    assert _get(setup, f"items/{setup[2]['honest']}/image").headers["content-type"] == "image/png"


def test_export_leaves_out_what_reaches_outside(setup: tuple[Server, Path, dict[str, str]]) -> None:
    r = _get(setup, "export")
    assert r.status_code == 200, r.text
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        contents = {name: z.read(name) for name in z.namelist()}
    assert all(SECRET not in data for data in contents.values())
    ids = setup[2]
    assert f"ng/crack/{ids['honest']}.png" in contents and f"ng/crack/{ids['heat']}.png" in contents
    assert not any(ids["named"] in name or ids["linked"] in name for name in contents)


def test_reviewer_keys_alone_leave_inspection_open(setup: tuple[Server, Path, dict[str, str]]) -> None:
    """As README's Keys say: only MSFLOW_API_KEYS guards the inspection and model routes;
    reviewer (and admin) keys guard their own routes, whatever else is set."""
    server = setup[0]
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
    assert_error(httpx.get(f"{server.url}/v1/review/{CATEGORY}/stats"), 401, "missing_api_key")
