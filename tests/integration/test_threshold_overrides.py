"""Runtime threshold overrides beyond one process and one version (service/pipeline/thresholds.py,
service/api/console.py): processes without Redis follow the override file, the first change on
a fresh overrides folder is locked, a DELETE survives Redis losing its marker, a change names
the version it was chosen for, and reviewer keys are forbidden on admin routes. Real files, a
private redis-server, and real ``msflow serve`` processes with the null engine (no model)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, assert_error, fake_version, start, wait_until
from models.manifest import Manifest
from service.config import Settings
from service.pipeline.thresholds import OVERRIDE_FILE, ThresholdOverrides

THRESHOLD = f"/v1/models/{CATEGORY}/threshold"
ADMIN = {"X-API-Key": ADMIN_KEY}


def test_without_redis_every_process_follows_the_file(tmp_path: Path) -> None:
    """MSFLOW_API_PROCESSES > 1 (or a worker on the same store) without Redis: a change made
    through one process reaches the others within MSFLOW_THRESHOLD_SYNC_S, a DELETE too (they
    kept the old value until restarted, answering with old and new at random)."""
    store = tmp_path / "store"
    man = Manifest.read(fake_version(store, CATEGORY, "1"))
    calibrated = man.calibration.threshold
    settings = Settings(model_store=store, threshold_sync_s=0.05)

    async def scenario() -> None:
        a, b = ThresholdOverrides(settings, None), ThresholdOverrides(settings, None)  # two front ends
        for o in (a, b):
            o.start(lambda: {CATEGORY: "1"})
            assert o.threshold(man) == calibrated  # both serving, the file read once

        async def b_sees(value: float) -> None:
            async with asyncio.timeout(5):
                while b.threshold(man) != value:
                    await asyncio.sleep(0.01)
        try:
            await a.set(CATEGORY, "1", calibrated + 0.25)
            await b_sees(calibrated + 0.25)
            await a.set(CATEGORY, "1", calibrated + 0.5, ng_threshold=calibrated + 0.75)  # same size, new file
            await b_sees(calibrated + 0.5)
            assert b.calibration(man).ng_bound == calibrated + 0.75
            await a.clear(CATEGORY, "1")
            await b_sees(calibrated)
            await b.set(CATEGORY, "1", calibrated - 0.25)  # and the other way round
            async with asyncio.timeout(5):
                while a.threshold(man) != calibrated - 0.25:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # several syncs: each keeps its own change, nothing flips back
            assert a.threshold(man) == b.threshold(man) == calibrated - 0.25
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_the_first_change_on_a_fresh_overrides_folder_is_locked(tmp_path: Path) -> None:
    """Compose and k8s point MSFLOW_THRESHOLD_OVERRIDES_DIR at /review/.thresholds, which does
    not exist before the first change: that change must take the lock as every other does
    (opening .threshold.lock failed, and it ran unlocked)."""
    import fcntl

    store = tmp_path / "store"
    man = Manifest.read(fake_version(store, CATEGORY, "1"))
    folder = tmp_path / "review" / ".thresholds"
    overrides = ThresholdOverrides(Settings(model_store=store, threshold_overrides_dir=folder), None)

    async def scenario() -> None:
        await overrides.set(CATEGORY, "1", 0.75, calibration=man.calibration)
        assert (folder / ".threshold.lock").is_file()  # the lock file was opened: the change was locked
        with open(folder / ".threshold.lock", "a+b") as held:  # and later changes wait for a holder
            fcntl.flock(held, fcntl.LOCK_EX)
            change = asyncio.create_task(overrides.set(CATEGORY, "1", 0.8, calibration=man.calibration))
            await asyncio.sleep(0.2)
            assert not change.done()
        await change
        assert overrides.threshold(man) == 0.8

    asyncio.run(scenario())
    assert json.loads((folder / CATEGORY / "1" / OVERRIDE_FILE).read_text())["threshold"] == 0.8


def test_a_delete_is_not_undone_when_redis_loses_its_marker(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that had not synced a DELETE when Redis lost its data (the marker with it)
    found the key missing and republished the override it remembered. Where the overrides
    folder is writable every change wrote the file: no file means calibrated."""
    from harness import RedisServer
    from service.redisq.connection import RedisConnection

    store = tmp_path / "store"
    man = Manifest.read(fake_version(store, CATEGORY, "1"))
    calibrated = man.calibration.threshold
    redis_server = RedisServer(tmp_path)
    key = "msflow-del:threshold:brick:1"
    try:
        async def scenario() -> None:
            settings = Settings(model_store=store, redis_url=redis_server.url, redis_prefix="msflow-del:")
            a, b = ThresholdOverrides(settings, RedisConnection(settings)), ThresholdOverrides(
                settings, RedisConnection(settings))
            await a.set(CATEGORY, "1", calibrated + 0.5)
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated + 0.5
            await a.clear(CATEGORY, "1")  # b has not synced it ...
            redis_server.client().flushall()  # ... when Redis loses the marker
            assert await b.refresh([(CATEGORY, "1")])
            assert b.threshold(man) == calibrated and redis_server.client().get(key) is None
            assert await a.refresh([(CATEGORY, "1")]) and a.threshold(man) == calibrated

            # A read-only folder (a store mounted read-only, Redis alone took the change): the
            # file is no record, and memory is all there is. Read-only as root needs a mount,
            # so this process is told it cannot write there.
            import service.pipeline.thresholds as thresholds

            monkeypatch.setattr(thresholds, "folder_writable", lambda folder: False)
            await a.set(CATEGORY, "1", calibrated + 0.25)
            (store / CATEGORY / "1" / OVERRIDE_FILE).unlink()  # what a read-only store never got
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated + 0.25
            redis_server.client().flushall()
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated + 0.25
            assert json.loads(redis_server.client().get(key))["threshold"] == calibrated + 0.25  # restored
            for o in (a, b):
                await o.conn.aclose()

        asyncio.run(scenario())
    finally:
        redis_server.stop()


def test_threshold_changes_name_their_version_and_reviewer_keys_are_forbidden(tmp_path: Path) -> None:
    """A valid reviewer key on an admin route is 403 forbidden (it was 401 invalid_api_key).
    A change names the version the operator chose it for: another version served answers 409
    version_changed and nothing is written, including when the store watch swaps a version in
    while the change waits for the overrides' lock (it landed on the old version)."""
    import fcntl
    import threading

    reviewer_key = "reviewer-key-789"
    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1")
    srv = start(store, tmp_path / "server.log", engine="null", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                reviewer_api_keys=f"alice={reviewer_key}", store_poll_s=0.2)
    url = srv.url + THRESHOLD
    try:
        reviewer = {"X-API-Key": reviewer_key}
        for r in (httpx.put(url, json={"threshold": 0.6}, headers=reviewer), httpx.delete(url, headers=reviewer),
                  httpx.get(f"{srv.url}/v1/models/{CATEGORY}/recent", headers=reviewer),
                  httpx.post(f"{srv.url}/v1/models/{CATEGORY}/reload", headers=reviewer)):
            assert_error(r, 403, "forbidden")
        assert_error(httpx.put(url, json={"threshold": 0.6}, headers={"X-API-Key": "nope"}), 401, "invalid_api_key")

        error = assert_error(httpx.put(url, json={"threshold": 0.6, "version": "2"}, headers=ADMIN), 409,
                             "version_changed")
        assert error["details"] == {"requested": "2", "serving": "1"}
        assert_error(httpx.delete(url, params={"version": "2"}, headers=ADMIN), 409, "version_changed")
        assert not (store / CATEGORY / "1" / OVERRIDE_FILE).exists()
        r = httpx.put(url, json={"threshold": 0.6, "version": "1"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["threshold"] == 0.6, r.text
        r = httpx.delete(url, params={"version": "1"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["override"] is None, r.text

        # The race: version 2 is swapped in while the change (for version 1) waits for the lock.
        answers: list[httpx.Response] = []
        with open(store / ".threshold.lock", "a+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # another replica's change in progress
            put = threading.Thread(target=lambda: answers.append(
                httpx.put(url, json={"threshold": 0.7, "version": "1"}, headers=ADMIN, timeout=30)))
            put.start()
            time.sleep(0.3)
            assert not answers  # waiting for the lock
            fake_version(store, CATEGORY, "2")
            wait_until(lambda: httpx.get(f"{srv.url}/readyz").json()["models"] == {CATEGORY: "2"}, 20,
                       "the store watch serving version 2")
        put.join(30)
        error = assert_error(answers[0], 409, "version_changed")
        assert error["details"] == {"requested": "1", "serving": "2"}
        for version in ("1", "2"):  # nothing written for either version
            assert not (store / CATEGORY / version / OVERRIDE_FILE).exists(), version
        state = httpx.get(url, headers={"X-API-Key": USER_KEY}).json()
        assert state["version"] == "2" and state["override"] is None
    finally:
        srv.stop()
