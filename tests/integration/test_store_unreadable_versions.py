"""A version folder the server cannot read is a failed version, said once: its manifest a
directory (a ``cp -r`` gone wrong), a link to nothing (a symlinked store whose target moved),
or a folder this process may not enter (wrong owner). Before, such a folder was left out of
the listing: a manifest that is not a file in silence, one behind a permission with a warning
at every scan; ``GET /v1/models`` (failed_versions) and ``msflow_model_versions_failed``
showed nothing. Tests run as root, who enters any folder: a directory or a dangling link in
the manifest's place fails for root too."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

import httpx
import pytest

from harness import CATEGORY, fake_version, metric, start, wait_until
from service.config import Settings
from service.pipeline.registry import ModelRegistry

MANIFEST = "manifest.json"


def _unreadable(store: Path, version: str) -> Path:
    """``<store>/brick/<version>`` whose manifest is a directory."""
    folder = store / CATEGORY / version
    (folder / MANIFEST).mkdir(parents=True)
    return folder


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "front-ends"])
def test_an_unreadable_version_folder_is_a_failed_version_said_once(tmp_path: Path, processes: int) -> None:
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    server = start(store, tmp_path / "server.log", engine="null", store_poll_s=0.1, api_processes=processes)
    polls = 1 if processes == 1 else 8  # fresh connections: the kernel spreads them over the front ends

    def failed() -> list[dict[str, str]]:
        return [httpx.get(f"{server.url}/v1/models/{CATEGORY}", timeout=5).json()["failed_versions"]
                for _ in range(polls)]

    def gauge() -> float:
        with httpx.Client(base_url=server.url, timeout=5) as c:
            return metric(c, "msflow_model_versions_failed", category=CATEGORY)
    try:
        folder = _unreadable(store, "2")
        wait_until(lambda: all("2" in f for f in failed()), 10, "version 2 shown failed")
        why = failed()[0]["2"]
        assert "not a file" in why and "<store>" in why and str(store) not in why, why
        wait_until(lambda: gauge() == 1, 10, "msflow_model_versions_failed at 1")
        (folder / MANIFEST).rmdir()
        (folder / MANIFEST).symlink_to(tmp_path / "elsewhere" / MANIFEST)  # another reason: said again
        wait_until(lambda: all("link" in f.get("2", "") for f in failed()), 10, "the new reason shown")
        # Model 1 serves on: inspection is unaffected, and readiness too.
        assert httpx.get(f"{server.url}/readyz", timeout=5).json()["categories"] == {CATEGORY: "serving 1"}
        time.sleep(0.5)  # five scans more: no warning repeated
        shutil.rmtree(folder)
        wait_until(lambda: all(f == {} for f in failed()), 10, "version 2 forgotten with its folder")
        wait_until(lambda: gauge() == 0, 10, "msflow_model_versions_failed back at 0")
        # A version that failed to load (a manifest that is no JSON) leaves the gauge with its
        # folder too: the record went, the gauge stayed at 1 until the next load or failure.
        (store / CATEGORY / "3").mkdir()
        (store / CATEGORY / "3" / MANIFEST).write_text("{not json")
        wait_until(lambda: all("3" in f for f in failed()) and gauge() == 1, 10, "version 3 failed to load")
        shutil.rmtree(store / CATEGORY / "3")
        wait_until(lambda: all(f == {} for f in failed()), 10, "version 3 forgotten with its folder")
        wait_until(lambda: gauge() == 0, 10, "msflow_model_versions_failed back at 0 once version 3 left")
        log = (tmp_path / "server.log").read_text(errors="replace")
        said = [line for line in log.splitlines() if "brick/2" in line and "WARNING" in line]
        # Once per reason in each process that scans the store (each front end watches it).
        assert len(said) == 2 * processes, "\n".join(said)
    finally:
        server.stop()


def test_the_reason_follows_the_folder_and_a_readable_folder_is_loaded(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """In one registry: a dangling link, then a manifest that is a directory, each said once
    however many scans; the folder made whole is loaded by the watch as any new version."""
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1))
    changed: list[str] = []
    registry.on_failed_versions_changed = changed.append

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        folder = store / CATEGORY / "2"
        folder.mkdir()
        (folder / MANIFEST).symlink_to(tmp_path / "gone.json")
        with caplog.at_level(logging.WARNING, logger="service.pipeline.registry"):
            for _ in range(3):
                assert await registry.refresh() == []
            assert "link" in registry.failed_versions(CATEGORY)["2"] and changed == [CATEGORY]
            (folder / MANIFEST).unlink()
            (folder / MANIFEST).mkdir()
            for _ in range(3):
                assert await registry.refresh() == []
            assert "not a file" in registry.failed_versions(CATEGORY)["2"] and changed == [CATEGORY] * 2
            assert registry.describe(CATEGORY).failed_versions == registry.failed_versions(CATEGORY)
        said = [r.getMessage() for r in caplog.records if "brick/2" in r.getMessage()]
        assert len(said) == 2, said
        (folder / MANIFEST).rmdir()
        shutil.rmtree(folder)
        fake_version(store, CATEGORY, "2")
        assert await registry.refresh() == [CATEGORY]
        assert registry.serving() == {CATEGORY: "2"} and registry.failed_versions(CATEGORY) == {}
        assert changed == [CATEGORY] * 3

    asyncio.run(main())
