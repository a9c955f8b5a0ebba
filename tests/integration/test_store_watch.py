"""The server picks up what is exported while it serves: a new category, a new version, and
never a half-written export folder; an empty store starts and becomes ready later."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx

from harness import CATEGORY, Server, part, start, wait_until
from models.data import MVTecCategory
from models.manifest import Manifest


def _copy_version(src: Path, dst: Path, category: str, version: str) -> None:
    """Export-like: written under a dot name, renamed into place when complete."""
    staging = dst.parent / f".{version}-partial"
    shutil.copytree(src, staging)
    Manifest.read(staging).model_copy(update={"category": category, "version": version}).write(staging)
    staging.rename(dst)


def test_new_category_and_version_appear_while_serving(model_store: Path, demo_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    image = next(s.path for s in MVTecCategory(demo_root, CATEGORY).test_samples() if s.label == 1)
    server = start(store, tmp_path / "server.log", store_poll_s=0.3)
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=30.0) as c:
            while not stop.is_set():
                r = c.post(f"/v1/inspect/{CATEGORY}", params={"heatmap": "none"}, files=[part(image)])
                statuses.append(r.status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        src = store / CATEGORY / "1"
        (store / CATEGORY / ".3-abcd").mkdir()  # a leftover export temp folder is never a version
        shutil.copy(src / "manifest.json", store / CATEGORY / ".3-abcd" / "manifest.json")
        _copy_version(src, store / CATEGORY / "2", CATEGORY, "2")
        (store / "gravel").mkdir()
        _copy_version(src, store / "gravel" / "1", "gravel", "1")

        def served() -> dict[str, str]:
            return httpx.get(f"{server.url}/readyz", timeout=5.0).json().get("models", {})

        wait_until(lambda: served() == {CATEGORY: "2", "gravel": "1"}, 60, "the new version and category")
        r = httpx.post(f"{server.url}/v1/inspect/gravel", params={"heatmap": "none"}, files=[part(image)], timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["model_version"] == "1"
        ready = httpx.get(f"{server.url}/readyz", timeout=5.0).json()
        assert ready["categories"] == {CATEGORY: "serving 2", "gravel": "serving 1"}
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(30)
        server.stop()
    assert statuses and set(statuses) == {200}, statuses  # no request failed across both swaps


def test_an_empty_store_starts_and_becomes_ready_when_a_model_arrives(model_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "empty"
    store.mkdir()
    server = Server(store, tmp_path / "server.log", store_poll_s=0.3)
    try:
        def alive() -> bool:
            try:
                return httpx.get(f"{server.url}/healthz", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(alive, 60, "healthz", interval=0.1)
        r = httpx.get(f"{server.url}/readyz", timeout=5.0)
        assert r.status_code == 503  # nothing to serve yet: out of rotation, but alive
        (store / CATEGORY).mkdir()
        _copy_version(model_store / CATEGORY / "1", store / CATEGORY / "1", CATEGORY, "1")
        server.wait_ready(60)
        assert httpx.get(f"{server.url}/readyz", timeout=5.0).json()["models"] == {CATEGORY: "1"}
    finally:
        server.stop()
