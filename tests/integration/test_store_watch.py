"""The server picks up what is exported while it serves: a new category, a new version, and
never a half-written export folder; an empty store starts and becomes ready later; the watch
never undoes an operator's pin."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from harness import (CATEGORY, Server, copy_version as _copy_version, fake_version, metric, part, png_of, start,
                     wait_until)
from models.build_progress import record_build, record_step
from models.data import MVTecCategory
from service.config import Settings
from service.engines.null import NullEngine
from service.pipeline.registry import ModelRegistry
from service.pipeline.registry_errors import ModelNotLoaded


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
        server.wait_alive(60)
        r = httpx.get(f"{server.url}/readyz", timeout=5.0)
        assert r.status_code == 503  # nothing to serve yet: out of rotation, but alive
        listing = httpx.get(f"{server.url}/v1/models", timeout=5.0).json()
        assert listing["models"] == [] and listing["building"] is None
        record_step(store, "quick", CATEGORY, "training", "12 sub-epochs")  # what scripts/build-demo.sh writes
        building = httpx.get(f"{server.url}/v1/models", timeout=5.0).json()["building"]
        assert building["state"] == "running"
        assert building["categories"][CATEGORY]["stages"]["quick"]["state"] == "training"
        # Inspecting it meanwhile: "being built, retry", not "unknown category; known: none"
        png = png_of(Image.new("RGB", (64, 64), (90, 90, 90)))
        for route in (f"/v1/inspect/{CATEGORY}", f"/v1/jobs/{CATEGORY}"):
            r = httpx.post(f"{server.url}{route}", files=[("file", ("x.png", png, "image/png"))], timeout=5.0)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_building", r.text
            assert "quick: training" in r.json()["error"]["message"] and r.headers["retry-after"] == "10"
        other = httpx.post(f"{server.url}/v1/inspect/gravel", files=[("file", ("x.png", png, "image/png"))],
                           timeout=5.0)
        assert other.status_code == 404 and other.json()["error"]["code"] == "unknown_category"  # not being built
        record_build(store, "stopped")  # scripts/demo.sh left mid-build: nobody builds it any more
        gone = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}", files=[("file", ("x.png", png, "image/png"))],
                          timeout=5.0)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_category", gone.text
        assert httpx.get(f"{server.url}/v1/models", timeout=5.0).json()["building"]["state"] == "stopped"
        record_step(store, "quick", CATEGORY, "exporting")  # a builder at work again: running
        (store / CATEGORY).mkdir()
        _copy_version(model_store / CATEGORY / "1", store / CATEGORY / "1", CATEGORY, "1")
        record_step(store, "quick", CATEGORY, "served")
        record_build(store, "done")
        server.wait_ready(60)
        assert httpx.get(f"{server.url}/readyz", timeout=5.0).json()["models"] == {CATEGORY: "1"}
        listing = httpx.get(f"{server.url}/v1/models", timeout=5.0).json()
        assert [m["category"] for m in listing["models"]] == [CATEGORY] and listing["building"]["state"] == "done"
    finally:
        server.stop()


def test_the_watch_never_undoes_an_operators_pin(tmp_path: Path) -> None:
    """An operator rolls back (reload ?version=1, a pin) while a new export lands and the
    watch polls during that load: the watch waits for the category's lock, then must see
    the pin and leave it, not load the newest over it."""
    store = tmp_path / "store"
    for version in ("1", "2"):
        fake_version(store, CATEGORY, version)
    gate = threading.Event()
    gate.set()

    def slow_factory(version_dir: Path, **_: Any) -> NullEngine:
        assert gate.wait(10), "test gate never opened"  # a load that takes a while (TensorRT, a big warm-up)
        return NullEngine(version_dir, max_batch_size=4)

    async def main() -> None:
        registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=0),
                                 engine_factory=slow_factory)
        registry.discover()
        await registry.load_all()
        assert registry.serving() == {CATEGORY: "2"}
        fake_version(store, CATEGORY, "3")  # a new export lands
        gate.clear()
        rollback = asyncio.create_task(registry.reload(CATEGORY, "1"))
        await asyncio.sleep(0.05)
        watch = asyncio.create_task(registry.refresh())  # the watch's poll meanwhile
        await asyncio.sleep(0.05)
        gate.set()
        assert (await rollback).pinned
        assert await watch == []
        assert registry.serving() == {CATEGORY: "1"} and registry.get(CATEGORY).pinned

    asyncio.run(main())


def _corrupt_copy(src: Path, dst: Path, version: str) -> None:
    """An export whose engine file no longer matches its manifest (a truncated copy)."""
    _copy_version(src, dst, CATEGORY, version)
    engine = next(p for p in dst.iterdir() if p.suffix in (".onnx", ".plan"))
    engine.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])


def test_a_broken_export_neither_takes_a_restarted_replica_down_nor_goes_uncounted(model_store: Path,
                                                                                   tmp_path: Path) -> None:
    """A replica started after a broken export serves the newest version that loads (it served
    nothing for the category, 503 not_ready), and every failed load moves
    msflow_model_load_failures_total (the MsflowModelLoadFailed alert's series; it never moved)."""
    store = tmp_path / "store"
    shutil.copytree(model_store, store)
    _corrupt_copy(store / CATEGORY / "1", store / CATEGORY / "2", "2")
    server = start(store, tmp_path / "server.log", store_poll_s=0.3)
    try:
        with httpx.Client(base_url=server.url, timeout=10.0) as c:
            ready = c.get("/readyz").json()
            assert ready["models"] == {CATEGORY: "1"} and ready["failed"] == {}, ready
            assert metric(c, "msflow_model_load_failures_total", category=CATEGORY) == 1
            # Standing, not only counted: the failure came before any scrape (its counter born at
            # 1 shows no increase to an alert), and /v1/models listed version 2 with no mark.
            assert metric(c, "msflow_model_versions_failed", category=CATEGORY) == 1
            assert list(c.get(f"/v1/models/{CATEGORY}").json()["failed_versions"]) == ["2"]
            _corrupt_copy(store / CATEGORY / "1", store / CATEGORY / "3", "3")
            wait_until(lambda: metric(c, "msflow_model_load_failures_total", category=CATEGORY) == 2, 30,
                       "the watch's failed load counted")
            assert c.get("/readyz").json()["models"] == {CATEGORY: "1"}
            assert metric(c, "msflow_model_versions_failed", category=CATEGORY) == 2
            failed = c.get(f"/v1/models/{CATEGORY}").json()["failed_versions"]
            assert list(failed) == ["2", "3"] and "model.onnx" in failed["3"], failed
    finally:
        server.stop()


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "front-ends"])
def test_a_version_replaced_under_its_own_number_is_served_with_its_new_content(tmp_path: Path,
                                                                                processes: int) -> None:
    """A category deleted and exported again (``msflow export`` numbers it 1 again), or a version
    folder replaced by a copy, within the removal grace: the server must serve what the store
    now holds under that number, not the model it loaded before because the name matches (it
    did, for good: GET /v1/models said version 1 at 32 px while the store's 1 was 48 px). Once
    swapped, the watch loads it no more (no reload at every scan). With front ends, each one's
    reload of the folder must get its new content from the engine process, which handed back
    the engine it hosted under that path (32 px for good on every front end): each look is
    several GETs on fresh connections, which the kernel spreads over the front ends."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1", size=32)
    server = start(store, tmp_path / "server.log", engine="null", store_poll_s=0.1, api_processes=processes)
    polls = 1 if processes == 1 else 16

    def described() -> list[dict[str, Any]]:
        return [httpx.get(f"{server.url}/v1/models/{CATEGORY}", timeout=5).json() for _ in range(polls)]

    def sizes() -> set[int]:
        return {m["input_size"] for m in described()}
    try:
        assert sizes() == {32}
        shutil.rmtree(store / CATEGORY)
        fake_version(store, CATEGORY, "1", size=48)
        wait_until(lambda: sizes() == {48}, 5, "the new content of version 1 served")
        loaded_at = {m["loaded_at"] for m in described()}
        time.sleep(0.5)  # five scans
        again = described()
        assert {m["loaded_at"] for m in again} <= loaded_at and all(m["failed_versions"] == {} for m in again), again
        assert {m["input_size"] for m in again} == {48}
        png = png_of(Image.new("RGB", (48, 48), (90, 90, 90)))
        for _ in range(polls // 2):  # the engine process runs the new model for the front ends
            r = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}", params={"heatmap": "none"},
                           files=[("file", ("a.png", png, "image/png"))], timeout=30)
            assert r.status_code == 200 and r.json()["results"][0]["model_version"] == "1", r.text
        assert httpx.get(f"{server.url}/readyz", timeout=5).json()["categories"] == {CATEGORY: "serving 1"}
    finally:
        server.stop()


def test_categories_the_watch_is_loading_are_known_as_loading(tmp_path: Path) -> None:
    """Categories copied into the store together load one after the other (they share the
    accelerator): meanwhile each is ``loading`` (``/readyz``), and a request for it is 503
    ``model_not_loaded`` (Retry-After), as at start-up, while the replica stays ready for what
    it serves. Before, they were unknown until loaded: 404 ``unknown_category`` ("known:
    brick") for a category in the store, for as long as the ones before it took to load."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    gate, entered = threading.Event(), threading.Event()

    def slow_factory(version_dir: Path, **_: Any) -> NullEngine:
        if version_dir.parent.name != CATEGORY:
            entered.set()
            assert gate.wait(10), "test gate never opened"  # a load that takes a while
        return NullEngine(version_dir, max_batch_size=4)

    async def main() -> None:
        registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1),
                                 engine_factory=slow_factory)
        registry.discover()
        await registry.load_all()
        for category in ("gravel", "tile"):
            fake_version(store, category, "1")
        watch = asyncio.create_task(registry.refresh())
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            assert registry.status() == {CATEGORY: "serving 1", "gravel": "loading", "tile": "loading"}
            assert registry.ready and registry.categories == [CATEGORY, "gravel", "tile"]
            with pytest.raises(ModelNotLoaded, match="still loading"):
                registry.get("tile")
        finally:
            gate.set()
        assert sorted(await watch) == ["gravel", "tile"]
        assert registry.status() == {CATEGORY: "serving 1", "gravel": "serving 1", "tile": "serving 1"}

    asyncio.run(main())
