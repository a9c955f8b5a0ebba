"""Runtime image-threshold overrides: move a category's threshold without re-exporting.

``PUT /v1/models/{category}/threshold`` with ``{"threshold": RAW}`` sets a raw-score
threshold for the version now serving (``"ng_threshold"`` moves the three-way verdict's ng
bound too, kept in the same record); ``DELETE`` returns to the calibrated ones. The
effective calibration (:meth:`ThresholdOverrides.calibration`, the manifest's with the
threshold replaced) decides ``is_anomalous`` and the normalised ``score`` of every image
scored from then on (the threshold maps to 0.5, see :class:`models.manifest.Calibration`).

An override belongs to one model **version**: a new version has its own calibration, and a
raw threshold of another model means nothing for it. Where it is kept:

* ``<dir>/<category>/<version>/threshold_override.json``, written atomically (temporary file,
  fsync, rename): the durable copy. ``<dir>`` is ``MSFLOW_THRESHOLD_OVERRIDES_DIR``, by default
  the model store itself (beside the manifest, never in ``manifest.json``, whose sha256s must
  stay valid). Deployments that mount the store read-only (compose, Kubernetes) point it at
  their writable volume, so the durable copy exists there too.
* Redis ``<prefix>threshold:<category>:<version>`` when ``MSFLOW_REDIS_URL`` is set, so
  every replica agrees: each re-reads the keys of its serving versions every
  ``MSFLOW_THRESHOLD_SYNC_S`` seconds (and at once when it first serves a version). While
  Redis is reachable it is authoritative (no key = calibrated, whatever a local file says);
  while it is not, a replica keeps what it last knew, and at start-up falls back to the file.

Redis data loss (FLUSHALL, a restart without persistence) must not revert an override: a
DELETE stores an explicit "calibrated" marker instead of removing the key, so a missing key
means "Redis lost it", never "calibrated". A replica that finds a serving version's key
missing restores it from the file (the durable source) or, on a read-only store, from what
it last knew, and re-publishes it with SET NX (the first replica wins; nobody overwrites a
newer change). A Redis read that was in flight during a change never overwrites it (a
per-key generation counter).

A threshold far outside what the calibration saw (:func:`sane_range`) is refused unless the
request says ``force``: ``1e30`` would pass every defect.

Two replicas changing one version at once must not leave Redis with one value and the file
with the other (the file would bring the loser back after a Redis data loss): a change holds
an exclusive ``flock`` on ``<dir>/.threshold.lock`` across both writes, so changes apply
whole, one after the other (advisory on network file systems, like the review store's).

A change needs at least one durable place: with Redis configured a PUT/DELETE whose Redis
write fails is refused (503, nothing changed) so replicas cannot disagree; the file may
fail (a read-only model store volume) when Redis took it. Without Redis the file must be
written, or the change is refused (500).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import math
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from models.manifest import Calibration, Manifest
from service.config import Settings
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.schemas import ThresholdOverride

log = logging.getLogger(__name__)

OVERRIDE_FILE = "threshold_override.json"

Key = tuple[str, str]  # (category, version)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the store's other files are world-readable
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_CALIBRATED_MARKER = "calibrated"  # Redis value field of an explicit "no override"


def sane_range(calibration: Calibration, seen: Sequence[float] = ()) -> tuple[float, float]:
    """Raw thresholds an operator may set without ``force``: the scores the calibration and
    the recent images (``seen``) spanned, widened by the calibration's width on each side.
    A threshold beyond every score ever seen flags everything or nothing."""
    span = max(calibration.score_max - calibration.score_min, 1e-12)
    finite = [x for x in seen if math.isfinite(x)]
    low = min([calibration.score_min, *finite])
    high = max([calibration.score_max, *finite])
    return low - span, high + span


class ThresholdOutOfRange(ValueError):
    """A threshold outside :func:`sane_range` without ``force``."""

    def __init__(self, threshold: float, low: float, high: float) -> None:
        super().__init__(f"threshold {threshold:.6g} is outside {low:.6g}..{high:.6g} (the scores of the "
                         "calibration and the recent images, widened); send \"force\": true to set it anyway")
        self.details = {"threshold": threshold, "sane_min": low, "sane_max": high}


class BoundsInverted(ValueError):
    """An ng bound below the ok bound: the review band would be negative."""

    def __init__(self, threshold: float, ng_threshold: float) -> None:
        super().__init__(f"ng_threshold {ng_threshold:.6g} is below threshold {threshold:.6g}: the ng bound must "
                         "be at or above the ok bound (equal: no review band)")
        self.details = {"threshold": threshold, "ng_threshold": ng_threshold}


class ThresholdNotPersisted(RuntimeError):
    """An override could not be written to (or removed from) the model store."""

    code = "threshold_not_persisted"


class ThresholdOverrides:
    """Overrides by (category, version): in memory for the hot path, persisted in the version
    folder and (when configured) Redis. Event-loop only."""

    def __init__(self, settings: Settings, conn: RedisConnection | None) -> None:
        self.store = Path(settings.model_store)
        self.root = Path(settings.threshold_overrides_dir or settings.model_store)
        self.conn = conn
        self.sync_s = settings.threshold_sync_s
        self._known: dict[Key, ThresholdOverride | None] = {}
        self._generation: dict[Key, int] = {}  # bumped by every change: stale Redis reads are dropped
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lookups (hot path)
    def get(self, category: str, version: str) -> ThresholdOverride | None:
        key = (category, version)
        if key not in self._known:
            # First sight of this version: its file now (a few hundred bytes, once), Redis
            # right after (authoritative when configured).
            self._known[key] = self._read_file(category, version)
            if self.conn is not None:
                self._refresh_soon([key])
        return self._known[key]

    def for_manifest(self, manifest: Manifest) -> ThresholdOverride | None:
        return self.get(manifest.category, manifest.version)

    def threshold(self, manifest: Manifest) -> float:
        """The effective raw threshold of ``manifest``'s version."""
        o = self.for_manifest(manifest)
        return manifest.calibration.threshold if o is None else o.threshold

    def calibration(self, manifest: Manifest) -> Calibration:
        """The manifest's calibration with the effective threshold (what decides a verdict)."""
        o = self.for_manifest(manifest)
        return manifest.calibration if o is None else manifest.calibration.with_threshold(o.threshold, o.ng_threshold)

    # ------------------------------------------------------------------ changes
    async def set(self, category: str, version: str, threshold: float, calibration: Calibration | None = None,
                  force: bool = False, seen: Sequence[float] = (),
                  ng_threshold: float | None = None) -> tuple[ThresholdOverride, list[str]]:
        """Override the ok bound (``threshold``) and, if given, the ng bound of one version."""
        if ng_threshold is not None and ng_threshold < threshold:
            raise BoundsInverted(threshold, ng_threshold)
        if calibration is not None and not force:
            low, high = sane_range(calibration, seen)
            for value in (threshold, ng_threshold):
                if value is not None and not low <= value <= high:
                    raise ThresholdOutOfRange(value, low, high)
        self._bump((category, version))
        override = ThresholdOverride(threshold=float(threshold), version=version,
                                     ng_threshold=None if ng_threshold is None else float(ng_threshold),
                                     set_at=datetime.now(timezone.utc).replace(microsecond=0))
        text = override.model_dump_json()
        persisted = []
        async with self._changing():
            if self.conn is not None:
                await self.conn.run("threshold_set", lambda r: r.set(self._redis_key(category, version), text))
                persisted.append("redis")
            try:
                await asyncio.to_thread(self._write, category, version, text + "\n")
                persisted.append("file")
            except OSError as exc:
                if not persisted:
                    raise ThresholdNotPersisted(f"cannot write {OVERRIDE_FILE} for {category}/{version} ({exc}) "
                                                "and no Redis is configured: the threshold is unchanged") from exc
                log.warning("%s/%s: threshold override kept in Redis only; %s not written: %s", category, version,
                            OVERRIDE_FILE, exc)
        self._known[(category, version)] = override
        log.info("%s/%s: threshold overridden to %.6g (%s)", category, version, threshold, ", ".join(persisted))
        return override, persisted

    async def clear(self, category: str, version: str) -> list[str]:
        self._bump((category, version))
        persisted = []
        async with self._changing():
            if self.conn is not None:
                marker = json.dumps({_CALIBRATED_MARKER: True, "version": version,
                                     "set_at": datetime.now(timezone.utc).isoformat()})
                await self.conn.run("threshold_clear", lambda r: r.set(self._redis_key(category, version), marker))
                persisted.append("redis")
            try:
                await asyncio.to_thread(self._path(category, version).unlink, True)
                persisted.append("file")
            except OSError as exc:
                if not persisted:
                    raise ThresholdNotPersisted(f"cannot remove {OVERRIDE_FILE} of {category}/"
                                                f"{version} ({exc}): the override stays") from exc
                log.warning("%s/%s: %s not removed (Redis says calibrated): %s", category, version, OVERRIDE_FILE,
                            exc)
        self._known[(category, version)] = None
        log.info("%s/%s: threshold back to the calibrated value", category, version)
        return persisted

    # ------------------------------------------------------------------ Redis sync
    def start(self, serving: Callable[[], dict[str, str]]) -> None:
        """Re-read the overrides of the serving versions from Redis every ``threshold_sync_s``."""
        if self.conn is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sync_loop(serving), name="threshold-sync")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def refresh(self, keys: list[Key]) -> bool:
        """Take the Redis values of ``keys``; restore those Redis lost. False if Redis is unreachable."""
        if self.conn is None or not keys:
            return False
        generations = [self._generation.get(k, 0) for k in keys]
        try:
            raw = await self.conn.run("threshold_get", lambda r: r.mget([self._redis_key(*k) for k in keys]))
        except RedisUnavailable:
            return False
        lost: list[tuple[Key, ThresholdOverride]] = []
        for key, generation, value in zip(keys, generations, raw):
            if self._generation.get(key, 0) != generation:
                continue  # changed while the read was in flight: the change wins
            if value is None:  # never written, or lost by Redis: the file (or our memory) decides
                restored = self._read_file(*key) or self._known.get(key)
                self._known[key] = restored
                if restored is not None:
                    lost.append((key, restored))
            else:
                self._known[key] = self._parse(value, key[1], f"Redis {self._redis_key(*key)}")
        for key, override in lost:
            await self._republish(key, override)
        return True

    async def _republish(self, key: Key, override: ThresholdOverride) -> None:
        text = override.model_dump_json()
        try:  # NX: a change another replica made meanwhile is newer than our copy
            written = await self.conn.run("threshold_restore", lambda r: r.set(self._redis_key(*key), text, nx=True))  # type: ignore[union-attr]
        except RedisUnavailable:
            return
        if written:
            log.warning("%s/%s: threshold override %.6g was missing in Redis (data lost?); restored", key[0], key[1],
                        override.threshold)

    def _bump(self, key: Key) -> None:
        self._generation[key] = self._generation.get(key, 0) + 1

    async def _sync_loop(self, serving: Callable[[], dict[str, str]]) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                await self.refresh(sorted(serving().items()))
            except Exception:  # never let the loop die
                log.exception("threshold sync failed")

    def _refresh_soon(self, keys: list[Key]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self.refresh(keys))
        except RuntimeError:  # no loop (a synchronous caller): the sync loop catches up
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # ------------------------------------------------------------------ storage
    def _path(self, category: str, version: str) -> Path:
        return self.root / category / version / OVERRIDE_FILE

    def _write(self, category: str, version: str, text: str) -> None:
        path = self._path(category, version)
        if self.root != self.store:  # its own tree: made as needed (in the store, the version folder exists)
            path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """Hold ``<dir>/.threshold.lock`` (exclusive) for one whole change: Redis and file."""
        try:
            fd = os.open(self.root / ".threshold.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only store without Redis fails at the write, with its own message
            yield
            return
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _redis_key(self, category: str, version: str) -> str:
        assert self.conn is not None
        return self.conn.key("threshold", category, version)

    def _read_file(self, category: str, version: str) -> ThresholdOverride | None:
        path = self._path(category, version)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return None
        return self._parse(text, version, str(path))

    @staticmethod
    def _parse(value: str | bytes | None, version: str, where: str) -> ThresholdOverride | None:
        if value is None:
            return None
        try:
            data = json.loads(value)
            if isinstance(data, dict) and data.get(_CALIBRATED_MARKER) is True:
                return None  # an explicit DELETE
            override = ThresholdOverride.model_validate(data)
        except (ValueError, ValidationError) as exc:
            log.warning("ignoring the invalid threshold override in %s: %s", where, exc)
            return None
        if override.version != version:  # a version folder copied under another name
            log.warning("ignoring the threshold override in %s: it was set for version %s", where, override.version)
            return None
        return override
