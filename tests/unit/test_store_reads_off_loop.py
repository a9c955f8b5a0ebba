"""The server reads the model store in threads, not on the event loop: the store watch's scan
(listings, the failed versions' folders) and ``GET /v1/models``'s descriptions. A store on a
network file system (NFS, EFS) answers each listing and ``stat`` over the network: on the
event loop, every request in flight waited for all of them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from harness import CATEGORY, fake_version, loop_gaps_during
from models.manifest import version_folders
from service.config import Settings
from service.engines.null import NullEngine
from service.pipeline import registry_view, store_watch
from service.pipeline.registry import ModelRegistry

SLOW_S = 0.3  # one category's listing on a slow network file system


async def _serving(store: Path, **kw: Any) -> ModelRegistry:
    """A registry serving ``store`` (the null engine unless ``engine_factory`` is given)."""
    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1), **kw)
    registry.discover()
    await registry.load_all()
    return registry


def _slow_listing(folder: Path) -> Any:
    time.sleep(SLOW_S)  # the network's round trips, in whichever thread reads
    return version_folders(folder)


def test_a_slow_store_listing_does_not_hold_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")

    async def main() -> list[float]:
        registry = await _serving(store)
        fake_version(store, CATEGORY, "2")
        monkeypatch.setattr(store_watch, "version_folders", _slow_listing)
        loaded, gaps = await loop_gaps_during(registry.refresh)
        assert loaded == [CATEGORY]  # the scan still sees version 2
        assert registry.get(CATEGORY).version == "2"
        return gaps

    gaps = asyncio.run(main())
    assert gaps and max(gaps) < SLOW_S / 2, f"the event loop stood still for {max(gaps):.3f} s during the scan"


def test_the_folders_of_failed_versions_are_read_off_the_event_loop_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch reads each failed version's folder on every scan (tried again once it changed:
    a copy completed, a permission fixed); on the event loop, a slow read held it as the listing did."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    broken: list[bool] = [True]

    def factory(version_dir: Path, **_: Any) -> NullEngine:
        if version_dir.name == "2" and broken[0]:
            raise RuntimeError("model.onnx: missing")
        return NullEngine(version_dir, max_batch_size=2)

    async def main() -> list[float]:
        registry = await _serving(store, engine_factory=factory)
        fake_version(store, CATEGORY, "2")
        assert await registry.refresh() == []  # version 2 fails, and is recorded failed
        assert registry.get(CATEGORY).version == "1"

        read_folder = store_watch.folder_state

        def slow_folder_state(folder: Path) -> Any:
            time.sleep(SLOW_S)
            return read_folder(folder)
        monkeypatch.setattr(store_watch, "folder_state", slow_folder_state)
        loaded, gaps = await loop_gaps_during(registry.refresh)
        assert loaded == []  # unchanged since it failed: not tried again
        broken[0] = False
        (store / CATEGORY / "2" / "model.onnx").write_bytes(b"weights")  # the copy completes
        assert await registry.refresh() == [CATEGORY]
        assert registry.get(CATEGORY).version == "2"
        return gaps

    gaps = asyncio.run(main())
    assert gaps and max(gaps) < SLOW_S / 2, f"the event loop stood still for {max(gaps):.3f} s during the scan"


def test_a_failure_recorded_after_the_scan_looked_is_still_a_failure(tmp_path: Path) -> None:
    """The scan compares the failed versions' folders in its thread, from a copy of their
    records; a version that failed again meanwhile (an operator's reload of it) has a new record,
    which the scan's "changed" does not speak for: it is skipped until the next scan looks."""
    folder = fake_version(tmp_path / "store", CATEGORY, "3")
    # What the folder held when it failed first.
    before = store_watch.FailedVersion("model.onnx: missing", (("manifest.json", 1, 2, 3, 4),))
    changed = store_watch.changed_since(folder.parent, {"3": before})
    assert changed == {"3": before}  # it holds something else now
    assert store_watch.failed_now({"3": before}, changed) == set()  # tried again
    # A reload of it failed after the scan looked.
    again = store_watch.FailedVersion("model.onnx: missing", store_watch.folder_state(folder))
    assert store_watch.failed_now({"3": again}, changed) == {"3"}  # skipped until the next scan


def test_a_models_description_reads_the_store_off_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /v1/models lists each category's versions and the served folder's evaluation assets:
    on the event loop, a dashboard polling it held every request in flight for those reads."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")

    async def main() -> list[float]:
        registry = await _serving(store)
        monkeypatch.setattr(registry_view, "version_folders", _slow_listing)
        (described,), gaps = await loop_gaps_during(registry.describe_all_off_loop)
        assert described == registry.describe(CATEGORY)  # the same answer as read on the loop
        assert described.available_versions == ["1"]
        one, more = await loop_gaps_during(lambda: registry.describe_off_loop(CATEGORY))
        assert one == described
        return gaps + more

    gaps = asyncio.run(main())
    assert gaps and max(gaps) < SLOW_S / 2, f"the event loop stood still for {max(gaps):.3f} s"


def test_inspecting_a_category_being_built_reads_its_progress_off_the_loop_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An inspect request naming a category not in the store asks the build's progress whether it
    is being built (503 ``model_building``, else 404). On the event loop each such request opened
    and parsed ``.build/status.json``: a flood of them, or a slow network file system, held every
    request in flight. Now the file is read in a thread, once for all the requests asking together."""
    from types import SimpleNamespace

    from models.build_progress import read_progress, record_step
    from service.api.deps import category_to_inspect
    from service.api.errors import ApiError

    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    record_step(store, "quick", "coming", "training")
    reads: list[float] = []

    def slow_read(folder: Path) -> Any:
        reads.append(time.monotonic())
        time.sleep(SLOW_S)
        return read_progress(folder)

    async def main() -> tuple[list[Any], list[float]]:
        registry = await _serving(store)
        monkeypatch.setattr(registry_view, "read_progress", slow_read)
        state: Any = SimpleNamespace(registry=registry)

        async def twenty_asking() -> list[Any]:
            return await asyncio.gather(*(category_to_inspect("coming", state) for _ in range(20)),
                                        return_exceptions=True)
        answers, gaps = await loop_gaps_during(twenty_asking)
        assert await category_to_inspect(CATEGORY, state) == CATEGORY  # a served category reads nothing
        return answers, gaps

    answers, gaps = asyncio.run(main())
    assert all(isinstance(a, ApiError) and a.status_code == 503 and a.code == "model_building" for a in answers), answers
    assert len(reads) == 1, f"{len(reads)} reads of the build's progress for 20 requests asking together"
    assert gaps and max(gaps) < SLOW_S / 2, f"the event loop stood still for {max(gaps):.3f} s"


def test_the_build_progress_is_parsed_again_only_when_its_file_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared reads, never a stale answer: a build that stopped is no longer reported as under
    way by the next request (the file is replaced whole, so its stat changes), and a file that did
    not change costs a stat, not a parse."""
    from models.build_progress import read_progress, record_build, record_step

    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    record_step(store, "quick", "coming", "training")
    parses: list[Path] = []

    def counted(folder: Path) -> Any:
        parses.append(folder)
        return read_progress(folder)

    async def main() -> None:
        registry = await _serving(store)
        monkeypatch.setattr(registry_view, "read_progress", counted)
        first = await registry.build_progress_off_loop()
        assert first is not None and first.state == "running"
        assert (await registry.build_progress_off_loop()) == first and len(parses) == 1  # unchanged: no parse
        record_build(store, "stopped")
        assert (await registry.build_progress_off_loop()).state == "stopped"  # changed: read again at once
        assert len(parses) == 2
        status_path(store).unlink()
        assert await registry.build_progress_off_loop() is None

    from models.build_progress import status_path
    asyncio.run(main())
