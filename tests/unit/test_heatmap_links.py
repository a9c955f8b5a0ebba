"""Heatmap links shared by the front ends of one multi-process server
(:class:`service.redisq.store.FolderLinks`): each front end writes its links as files in a
folder of its own, bounds it by the in-process budgets, and reads any front end's by id.
Real files in a temporary run directory; two stores stand for two front ends."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from service.config import Settings
from service.redisq.store import LINK_ID, FolderLinks, HeatmapLinks, MemoryLinks
from service.supervisor.run_dir import frontend_links, mode_warnings


def fronts(root: Path, max_items: int = 8, max_bytes: int = 1 << 20, ttl_s: float = 60.0) -> tuple[FolderLinks, ...]:
    return tuple(FolderLinks(frontend_links(root, i), max_items, max_bytes, ttl_s) for i in range(2))


def put(store: FolderLinks, png: bytes) -> str:
    key = store.new_id()
    asyncio.run(store.put(key, png))
    return key


def get(store: FolderLinks, key: str) -> bytes | None:
    return asyncio.run(store.get(key))


def test_a_link_made_by_one_front_end_is_served_by_every_front_end(tmp_path: Path) -> None:
    a, b = fronts(tmp_path, max_bytes=8 << 20)
    keys = [put(a, b"png-a"), put(b, b"png-b")]
    assert [k[:2] for k in keys] == ["00", "01"] and all(LINK_ID.match(k) for k in keys)
    for store in (a, b):
        assert [get(store, k) for k in keys] == [b"png-a", b"png-b"]
        assert get(store, "00" + "x" * 30) is None and get(store, "zz" + "x" * 30) is None
    assert len({a.new_id() for _ in range(1000)}) == 1000
    big = os.urandom(3 << 20)  # written and read in a thread
    key = put(a, big)
    assert get(b, key) == big and (a.folder / key).stat().st_size == len(big)


def test_the_owner_bounds_its_folder_and_deletes_what_it_evicts(tmp_path: Path) -> None:
    a, b = fronts(tmp_path, max_items=3, max_bytes=1000)
    keys = [put(a, bytes(100)) for _ in range(4)]  # past 3 links: the oldest goes
    assert get(b, keys[0]) is None and all(get(b, k) == bytes(100) for k in keys[1:])
    assert sorted(os.listdir(a.folder)) == sorted(keys[1:])
    keys.append(put(a, bytes(950)))  # past 1000 bytes: the older ones go until it fits
    assert os.listdir(a.folder) == [keys[-1]] and len(a) == 1 and get(b, keys[-1]) == bytes(950)


def test_a_link_expires_for_every_front_end_and_its_owner_deletes_it(tmp_path: Path) -> None:
    a, b = fronts(tmp_path, ttl_s=0.3)
    key = put(a, b"png")
    assert get(b, key) == b"png"
    past = time.time() - 1.0  # the file's age is what another front end knows of it
    os.utime(a.folder / key, (past, past))
    assert get(b, key) is None and (a.folder / key).exists()
    time.sleep(0.35)
    put(a, b"next")  # the owner drops what expired when it next writes
    assert get(a, key) is None and not (a.folder / key).exists()


def test_a_link_that_cannot_be_written_stays_with_its_owner(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = fronts(tmp_path)
    os.rmdir(a.folder)  # no file can go there (as a full disk)
    os.mkfifo(a.folder)  # and none will: not a folder
    with caplog.at_level(logging.WARNING):
        keys = [put(a, b"kept"), put(a, b"kept")]
    assert [get(a, k) for k in keys] == [b"kept", b"kept"] and get(b, keys[0]) is None
    assert sum("cannot write" in r.message for r in caplog.records) == 1  # once, not per link
    os.unlink(a.folder)
    a.folder.mkdir()
    assert get(b, put(a, b"shared")) == b"shared"


def test_the_folder_is_cleared_at_start(tmp_path: Path) -> None:
    folder = frontend_links(tmp_path, 0)
    folder.mkdir()
    (folder / ("00" + "y" * 30)).write_bytes(b"a killed predecessor's")
    FolderLinks(folder, 8, 1 << 20, 60.0)
    assert os.listdir(folder) == []
    with pytest.raises(ValueError):
        FolderLinks(tmp_path / "links", 8, 1 << 20, 60.0)


def test_heatmap_links_use_files_only_in_a_front_end_of_a_multi_process_server(tmp_path: Path) -> None:
    single = HeatmapLinks(Settings(), None)
    assert isinstance(single.memory, MemoryLinks) and single.shared is None
    front = HeatmapLinks(Settings(heatmap_links_dir=frontend_links(tmp_path, 1)), None)
    assert front.memory is None and isinstance(front.shared, FolderLinks)
    worker = HeatmapLinks(Settings(heatmap_links_dir=frontend_links(tmp_path, 2)), None, memory=False)
    assert worker.memory is None and worker.shared is None

    async def round_trip() -> None:
        link, durable = await front.put(b"png", 4, 4)
        other = HeatmapLinks(Settings(heatmap_links_dir=frontend_links(tmp_path, 3)), None)
        assert not durable and await other.get(link.url.split("/")[-1][:-4]) == b"png"
    asyncio.run(round_trip())


def test_start_warns_when_the_links_cannot_fit_the_run_directory(tmp_path: Path) -> None:
    assert mode_warnings(Settings(api_processes=2), tmp_path) == []
    [warning] = mode_warnings(Settings(api_processes=2, heatmap_memory_bytes=1 << 60), tmp_path)
    assert "MSFLOW_HEATMAP_MEMORY_BYTES" in warning and str(tmp_path) in warning
