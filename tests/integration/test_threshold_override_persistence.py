"""Where a runtime threshold override is kept (:mod:`service.pipeline.thresholds`): beside the
manifest (never changing it), in Redis shared by replicas that converge on it, restored after
Redis loses its data, in MSFLOW_THRESHOLD_OVERRIDES_DIR when the store is read-only, whole under
concurrent changes, and refused when it cannot be kept. Real files and a private
redis-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from harness import CATEGORY, store_copy
from models.manifest import Manifest
from service.config import Settings
from service.pipeline.thresholds import OVERRIDE_FILE, ThresholdOutOfRange, ThresholdOverrides, sane_range


def test_overrides_file_redis_and_replicas(model_store: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import service.pipeline.thresholds as thresholds
    from harness import RedisServer

    store = store_copy(model_store, tmp_path)
    man = Manifest.read(store / CATEGORY / "1")
    calibrated = man.calibration.threshold
    redis_server = RedisServer(tmp_path)
    try:
        async def scenario() -> None:
            from service.redisq.connection import RedisConnection

            plain = ThresholdOverrides(Settings(model_store=store), None)
            assert plain.threshold(man) == calibrated and plain.calibration(man) == man.calibration
            o, persisted = await plain.set(CATEGORY, "1", calibrated + 1.0)
            assert persisted == ["file"] and plain.threshold(man) == calibrated + 1.0
            assert plain.calibration(man).threshold == calibrated + 1.0
            assert plain.calibration(man).pixel_threshold == man.calibration.pixel_threshold
            # a new process reads the file; the manifest's sha256s are untouched
            assert ThresholdOverrides(Settings(model_store=store), None).threshold(man) == calibrated + 1.0
            Manifest.read(store / CATEGORY / "1").verify_files(store / CATEGORY / "1")
            # an override of another version (a copied folder) is ignored
            assert ThresholdOverrides(Settings(model_store=store), None).get(CATEGORY, "2") is None
            assert await plain.clear(CATEGORY, "1") == ["file"]
            assert not (store / CATEGORY / "1" / OVERRIDE_FILE).exists() and plain.threshold(man) == calibrated

            # two replicas sharing Redis: Redis is authoritative, the other converges on refresh
            settings = Settings(model_store=store, redis_url=redis_server.url, redis_prefix="msflow-thr:")
            conns = [RedisConnection(settings), RedisConnection(settings)]
            a, b = (ThresholdOverrides(settings, c) for c in conns)
            assert b.threshold(man) == calibrated
            _, persisted = await a.set(CATEGORY, "1", calibrated - 0.5)
            assert persisted == ["redis", "file"]
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated - 0.5
            assert redis_server.client().get("msflow-thr:threshold:brick:1") is not None
            await a.clear(CATEGORY, "1")
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated
            # a stale local file does not win over Redis ("no key" = calibrated)
            (store / CATEGORY / "1" / OVERRIDE_FILE).write_text(
                json.dumps({"threshold": 9.0, "version": "1", "set_at": "2026-01-01T00:00:00Z"}))
            c = ThresholdOverrides(settings, RedisConnection(settings))
            assert c.threshold(man) == 9.0  # first sight: the file, until Redis answers ...
            assert await c.refresh([(CATEGORY, "1")]) and c.threshold(man) == calibrated  # ... then Redis
            # Redis loses its data: the file restores the override and it is re-published
            key = "msflow-thr:threshold:brick:1"
            await a.set(CATEGORY, "1", calibrated - 0.25)
            redis_server.client().flushall()
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated - 0.25
            assert json.loads(redis_server.client().get(key))["threshold"] == calibrated - 0.25
            # ... and with no file on a read-only store (Redis alone took the change), a
            # replica's memory does (read-only as root needs a mount: the process is told so)
            monkeypatch.setattr(thresholds, "folder_writable", lambda folder: False)
            (store / CATEGORY / "1" / OVERRIDE_FILE).unlink()
            redis_server.client().flushall()
            assert await a.refresh([(CATEGORY, "1")]) and a.threshold(man) == calibrated - 0.25
            assert json.loads(redis_server.client().get(key))["threshold"] == calibrated - 0.25
            monkeypatch.undo()
            # a DELETE is an explicit marker, not a missing key: it is never "restored" away
            await a.clear(CATEGORY, "1")
            assert redis_server.client().get(key) is not None
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated
            # far outside the calibration's scores: refused unless forced
            with pytest.raises(ThresholdOutOfRange):
                await a.set(CATEGORY, "1", 1e30, calibration=man.calibration)
            assert a.threshold(man) == calibrated
            low, high = sane_range(man.calibration)
            assert low < calibrated < high
            await a.set(CATEGORY, "1", 1e30, calibration=man.calibration, force=True)
            assert a.threshold(man) == 1e30
            await a.clear(CATEGORY, "1")
            # Redis down: a change is refused (replicas must not disagree), what is known stays
            redis_server.stop()
            with pytest.raises(Exception, match="Redis"):
                await a.set(CATEGORY, "1", 5.0)
            assert not await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated
            for conn in (*conns, c.conn):
                await conn.aclose()

        asyncio.run(scenario())
    finally:
        redis_server.stop()


def test_overrides_kept_off_a_read_only_store_survive_flushall_and_races(model_store: Path, tmp_path: Path) -> None:
    """MSFLOW_THRESHOLD_OVERRIDES_DIR (what compose and k8s set, their store being read-only):
    the durable copy lives there, so a new replica with no memory restores it after a FLUSHALL;
    two replicas changing one version at once leave Redis and the file agreeing; and a Redis
    read in flight during a change never brings the old value back."""
    from harness import RedisServer
    from service.redisq.connection import RedisConnection

    man = Manifest.read(model_store / CATEGORY / "1")
    calibrated = man.calibration.threshold
    state = tmp_path / "state" / ".thresholds"
    redis_server = RedisServer(tmp_path)
    try:
        async def scenario() -> None:
            settings = Settings(model_store=model_store, redis_url=redis_server.url, redis_prefix="msflow-dir:",
                                threshold_overrides_dir=state)
            a, b = ThresholdOverrides(settings, RedisConnection(settings)), ThresholdOverrides(
                settings, RedisConnection(settings))
            await a.set(CATEGORY, "1", calibrated + 0.5)
            assert (state / CATEGORY / "1" / OVERRIDE_FILE).is_file()
            assert not (model_store / CATEGORY / "1" / OVERRIDE_FILE).exists()  # the store is not written
            redis_server.client().flushall()
            fresh = ThresholdOverrides(settings, RedisConnection(settings))  # a replica started after the loss
            assert await fresh.refresh([(CATEGORY, "1")]) and fresh.threshold(man) == calibrated + 0.5
            key = "msflow-dir:threshold:brick:1"
            assert json.loads(redis_server.client().get(key))["threshold"] == calibrated + 0.5

            for round_ in range(10):  # concurrent changes apply whole: Redis and the file end equal
                await asyncio.gather(a.set(CATEGORY, "1", calibrated + 0.01 * round_),
                                     b.set(CATEGORY, "1", calibrated - 0.01 * round_))
                in_redis = json.loads(redis_server.client().get(key))["threshold"]
                on_disk = json.loads((state / CATEGORY / "1" / OVERRIDE_FILE).read_text())["threshold"]
                assert in_redis == on_disk, round_

            real_run = a.conn.run  # a read slowed down in flight, and a change made meanwhile

            async def slow_reads(op: str, fn: Any) -> Any:
                value = await real_run(op, fn)
                if op == "threshold_get":
                    await asyncio.sleep(0.3)
                return value
            a.conn.run = slow_reads  # type: ignore[method-assign]
            reading = asyncio.create_task(a.refresh([(CATEGORY, "1")]))
            await asyncio.sleep(0.1)
            a.conn.run = real_run  # type: ignore[method-assign]
            await a.set(CATEGORY, "1", calibrated + 0.2)
            await reading
            assert a.threshold(man) == calibrated + 0.2  # the stale read was dropped
            await a.clear(CATEGORY, "1")
            for conn in (a.conn, b.conn, fresh.conn):
                await conn.aclose()

        asyncio.run(scenario())
    finally:
        redis_server.stop()


def test_override_on_a_read_only_store_without_redis(model_store: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import service.pipeline.thresholds as thresholds

    def read_only(path: Path, text: str, **_: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(thresholds, "write_atomic", read_only)
    overrides = ThresholdOverrides(Settings(model_store=model_store), None)
    with pytest.raises(Exception, match="cannot write") as info:
        asyncio.run(overrides.set(CATEGORY, "1", 1.0))
    assert getattr(info.value, "code", None) == "threshold_not_persisted"
    assert overrides.get(CATEGORY, "1") is None  # nothing changed


def test_an_unreadable_override_in_redis_never_reverts_to_calibrated(model_store: Path, tmp_path: Path) -> None:
    """A Redis key holding what this server cannot read (garbage, an override for another
    version) is not "calibrated": every replica's sync took it as the explicit DELETE marker
    and served the calibrated threshold while the override file still held the operator's
    (measured on a served brick: 2.5 -> 2.5959 within one sync). The file decides, as for a
    key Redis lost."""
    from harness import RedisServer
    from service.redisq.connection import RedisConnection

    man = Manifest.read(model_store / CATEGORY / "1")
    calibrated = man.calibration.threshold
    redis_server = RedisServer(tmp_path)
    try:
        async def scenario() -> None:
            settings = Settings(model_store=model_store, redis_url=redis_server.url, redis_prefix="msflow-bad:",
                                threshold_overrides_dir=tmp_path / "thresholds")
            a, b = (ThresholdOverrides(settings, RedisConnection(settings)) for _ in range(2))
            key = "msflow-bad:threshold:brick:1"
            await a.set(CATEGORY, "1", calibrated + 0.5)
            for junk in (b"garbage", b"\xff\xfe", b"[]", json.dumps(
                    {"threshold": 7.0, "version": "2", "set_at": "2026-01-01T00:00:00Z"}).encode()):
                redis_server.client().set(key, junk)
                for o in (a, b):
                    assert await o.refresh([(CATEGORY, "1")])
                    assert o.threshold(man) == calibrated + 0.5, junk
            await a.clear(CATEGORY, "1")  # a DELETE's marker still means calibrated
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated
            redis_server.client().set(key, b"garbage")  # and an unreadable key after it: the file (none)
            assert await b.refresh([(CATEGORY, "1")]) and b.threshold(man) == calibrated
            for o in (a, b):
                await o.conn.aclose()  # type: ignore[union-attr]

        asyncio.run(scenario())
    finally:
        redis_server.stop()


def test_an_override_larger_than_any_written_is_not_read_whole(model_store: Path, tmp_path: Path) -> None:
    """A Redis key or a file of the overrides folder holding far more than an override (a valid
    one padded with 16 MB of spaces: another writer's, or garbage) was read whole, Redis's by
    every replica every MSFLOW_THRESHOLD_SYNC_S, and then served as the operator's threshold.
    Now at most one byte past the largest override is read, and such a value is unusable: the
    file decides, as for any unreadable key."""
    from harness import RedisServer
    from service.pipeline.threshold_files import MAX_STORED_BYTES, read_override
    from service.redisq.connection import RedisConnection

    man = Manifest.read(model_store / CATEGORY / "1")
    calibrated = man.calibration.threshold
    padded = json.dumps({"threshold": calibrated + 9, "version": "1",
                         "set_at": "2026-01-01T00:00:00Z"}).encode() + b" " * (16 << 20)
    far_file = tmp_path / "far.json"
    far_file.write_bytes(padded)
    assert read_override(far_file, "1") is None
    fits = tmp_path / "fits.json"
    fits.write_bytes(padded[:MAX_STORED_BYTES])  # as large as an override may be: read
    assert read_override(fits, "1") is not None
    redis_server = RedisServer(tmp_path)
    try:
        async def scenario() -> None:
            settings = Settings(model_store=model_store, redis_url=redis_server.url, redis_prefix="msflow-far:",
                                threshold_overrides_dir=tmp_path / "thresholds")
            a = ThresholdOverrides(settings, RedisConnection(settings))
            await a.set(CATEGORY, "1", calibrated + 0.5)
            r = redis_server.client()
            r.set("msflow-far:threshold:brick:1", padded)
            sent_before = int(r.info("stats")["total_net_output_bytes"])
            assert await a.refresh([(CATEGORY, "1")])
            sent = int(r.info("stats")["total_net_output_bytes"]) - sent_before
            assert sent < 1 << 20, f"{sent} bytes read for one sync"
            assert a.threshold(man) == calibrated + 0.5  # the file's, not the padded key's
            await a.conn.aclose()  # type: ignore[union-attr]

        asyncio.run(scenario())
    finally:
        redis_server.stop()
