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
  fsync, rename: :mod:`service.pipeline.threshold_files`): the durable copy. ``<dir>`` is
  ``MSFLOW_THRESHOLD_OVERRIDES_DIR``, by default the model store itself (beside the manifest,
  never in ``manifest.json``, whose sha256s must stay valid). Deployments that mount the
  store read-only (compose, Kubernetes) point it at their writable volume, so the durable
  copy exists there too.
* Redis ``<prefix>threshold:<category>:<version>`` when ``MSFLOW_REDIS_URL`` is set, so
  every replica agrees: each re-reads the keys of its serving versions every
  ``MSFLOW_THRESHOLD_SYNC_S`` seconds (and at once when it first serves a version). While
  Redis is reachable it is authoritative (no key = calibrated, whatever a local file says);
  while it is not, a replica keeps what it last knew, and at start-up falls back to the file.
* Without Redis the file is the only shared copy: every process (the front ends of
  ``MSFLOW_API_PROCESSES``, a worker on the same store) looks at the files of its serving
  versions every ``MSFLOW_THRESHOLD_SYNC_S`` and reads one again when its ``stat`` (inode,
  mtime, size) changed, or at least every :data:`FILE_MAX_AGE_S` (a rename onto a reused
  inode within one coarse timestamp tick looks unchanged). So a change made through one
  process reaches the others within the sync period; until then they answer with the old
  value.

Redis data loss (FLUSHALL, a restart without persistence) must not revert an override: a
DELETE stores an explicit "calibrated" marker instead of removing the key, so a missing key
means "Redis lost it", never "calibrated". A replica that finds a serving version's key
missing restores it from the file and re-publishes it with SET NX (the first replica wins;
nobody overwrites a newer change). Where the overrides folder is writable every change
wrote the file, so the file is the truth and a missing file means calibrated: a DELETE
removed it, and a replica that had not synced that DELETE before Redis lost the marker must
not bring the old value back from its memory. Only where the folder is read-only (Redis
alone took the changes) does a replica fall back to what it last knew. A Redis read that
was in flight during a change never overwrites it (a per-key generation counter).

A threshold far outside what the calibration saw (:func:`sane_range`) is refused unless the
request says ``force``: ``1e30`` would pass every defect. Only a bound the change moves is
checked (one left at its calibrated or current value is none: a forced one refused every later
change of the other, naming a value the operator never sent). Recent images widen that range only
as far as :data:`RANGE_SUPPORT` of them reach: one junk frame (a black image scored 513 on
brick, whose calibration spans 2.2..3.0) made a threshold of 400, which passes every real
defect, look sane.

Two replicas changing one version at once must not leave Redis with one value and the file
with the other (the file would bring the loser back after a Redis data loss): a change holds
an exclusive ``flock`` on ``<dir>/.threshold.lock`` across both writes, so changes apply
whole, one after the other (advisory on network file systems, like the review store's).
A ``<dir>`` other than the model store is made first: on a fresh volume the first change
would otherwise find no folder for the lock file and run unlocked.

A change may carry a ``guard`` (the API's: the version it is for is still the one served),
called once the lock is held and before anything is written: a version swapped in while
the change waited for the lock (the store watch, a reload) refuses the change rather than
leave it on a version nobody serves.

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
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from models.atomic_files import write_atomic
from models.manifest import Calibration, Manifest
from service.config import Settings
from service.pipeline.threshold_files import (CALIBRATED_MARKER, MAX_STORED_BYTES, OVERRIDE_FILE, FileStat, file_stat,
                                              folder_writable, parse_stored, read_override)
from service.redisq.connection import RedisConnection, RedisUnavailable
from service.redisq.tasks import cancel_and_wait
from service.schemas import ThresholdOverride

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (category, version)
# Without Redis, the longest a process trusts an unchanged stat of an override file: a rename
# onto a reused inode, same size, within one coarse timestamp tick, would look unchanged.
FILE_MAX_AGE_S = 30.0
# Recent images extend the sane range only where at least this many distinct scores lie: a
# threshold beyond all but one or two of them flags (or passes) nothing but those outliers.
RANGE_SUPPORT = 3


def sane_range(calibration: Calibration, seen: Sequence[float] = ()) -> tuple[float, float]:
    """Raw thresholds an operator may set without ``force``: the scores the calibration
    spanned, extended to where :data:`RANGE_SUPPORT` recent scores (``seen``) reach, widened
    by the calibration's width on each side. A threshold beyond every score seen but a
    couple flags everything or nothing. Distinct scores: the same image sent again (the
    result cache off) is one image."""
    span = max(calibration.score_max - calibration.score_min, 1e-12)
    finite = sorted({x for x in seen if math.isfinite(x)})
    low, high = calibration.score_min, calibration.score_max
    if len(finite) >= RANGE_SUPPORT:
        low = min(low, finite[RANGE_SUPPORT - 1])
        high = max(high, finite[-RANGE_SUPPORT])
    return low - span, high + span


class ThresholdOutOfRange(ValueError):
    """A threshold outside :func:`sane_range` without ``force``."""

    def __init__(self, threshold: float, low: float, high: float, field: str = "threshold") -> None:
        super().__init__(f"{field} {threshold:.6g} is outside {low:.6g}..{high:.6g} (the scores of the "
                         f"calibration and where at least {RANGE_SUPPORT} recent images scored, widened); send "
                         "\"force\": true to set it anyway")
        self.details = {"threshold": threshold, "field": field, "sane_min": low, "sane_max": high}


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
        self._generation: dict[Key, int] = {}  # bumped by every change: stale reads are dropped
        # Without Redis: the stat of each override file when it was last read, and when (monotonic).
        self._file_seen: dict[Key, tuple[FileStat, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lookups (hot path)
    def get(self, category: str, version: str) -> ThresholdOverride | None:
        key = (category, version)
        if key not in self._known:
            # First sight of this version: its file now (a few hundred bytes, once), Redis
            # right after (authoritative when configured). The stat is taken before the read:
            # a change racing it looks like a change at the next sync, and is read again.
            seen = (file_stat(self._path(category, version)), time.monotonic())
            self._known[key] = self._read_file(category, version)
            self._file_seen[key] = seen
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
                  ng_threshold: float | None = None,
                  guard: Callable[[], None] | None = None) -> tuple[ThresholdOverride, list[str]]:
        """Override the ok bound (``threshold``) and, if given, the ng bound of one version.
        ``guard`` runs once the lock is held, before any write; what it raises refuses the change."""
        if ng_threshold is not None and ng_threshold < threshold:
            raise BoundsInverted(threshold, ng_threshold)
        if calibration is not None and not force:
            # Only what moves: a bound left at its calibrated or current value is no change (the
            # API carries the bound a body leaves out; a forced one failed every later change).
            low, high = sane_range(calibration, seen)
            now = self.get(category, version)
            for field, value, standing in (
                    ("threshold", threshold, (calibration.threshold, now and now.threshold)),
                    ("ng_threshold", ng_threshold, (calibration.ng_bound, now and now.ng_threshold))):
                if value is not None and value not in standing and not low <= value <= high:
                    raise ThresholdOutOfRange(value, low, high, field)
        self._bump((category, version))
        override = ThresholdOverride(threshold=float(threshold), version=version,
                                     ng_threshold=None if ng_threshold is None else float(ng_threshold),
                                     set_at=datetime.now(timezone.utc).replace(microsecond=0))
        text = override.model_dump_json()
        persisted = []
        async with self._changing():
            if guard is not None:
                guard()
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
        self._file_seen.pop((category, version), None)  # read our own file again at the next sync: cheap, sure
        log.info("%s/%s: threshold overridden to %.6g (%s)", category, version, threshold, ", ".join(persisted))
        return override, persisted

    async def clear(self, category: str, version: str, guard: Callable[[], None] | None = None) -> list[str]:
        """Back to the calibrated bounds of one version (``guard``: as for :meth:`set`)."""
        self._bump((category, version))
        persisted = []
        async with self._changing():
            if guard is not None:
                guard()
            if self.conn is not None:
                marker = json.dumps({CALIBRATED_MARKER: True, "version": version,
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
        self._file_seen.pop((category, version), None)
        log.info("%s/%s: threshold back to the calibrated value", category, version)
        return persisted

    # ------------------------------------------------------------------ sync (Redis, else the files)
    def start(self, serving: Callable[[], dict[str, str]]) -> None:
        """Re-read the overrides of the serving versions every ``threshold_sync_s``: from Redis
        when configured, else from their files where those changed."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sync_loop(serving), name="threshold-sync")

    async def stop(self) -> None:
        # Cancelled again until they end: one cancel() can be lost during a Redis call (tasks.py).
        await cancel_and_wait([self._task, *self._pending])
        self._task = None

    async def refresh(self, keys: list[Key]) -> bool:
        """Take the Redis values of ``keys``; restore those Redis lost. False if Redis is unreachable."""
        if self.conn is None or not keys:
            return False
        generations = [self._generation.get(k, 0) for k in keys]
        try:
            raw = await self.conn.get_bounded("threshold_get", [self._redis_key(*k) for k in keys], MAX_STORED_BYTES)
        except RedisUnavailable:
            return False
        lost: list[tuple[Key, ThresholdOverride]] = []
        for key, generation, value in zip(keys, generations, raw):
            if self._generation.get(key, 0) != generation:
                continue  # changed while the read was in flight: the change wins
            usable, override = parse_stored(value, key[1], f"Redis {self._redis_key(*key)}")
            if value is None or not usable:  # never written, lost by Redis, or unreadable here
                # A writable folder took every change: its file decides, and no file means
                # calibrated (memory could hold an override a DELETE removed before Redis lost
                # the marker). A read-only one took none: what we last knew is all there is.
                # An unreadable value (garbage, another version's) is no DELETE either: it
                # reverted every replica to calibrated. It stays (no NX write replaces it).
                restored = self._read_file(*key)
                if restored is None and not self._file_is_durable(*key):
                    restored = self._known.get(key)
                self._known[key] = restored
                if restored is not None and value is None:
                    lost.append((key, restored))
            else:
                self._known[key] = override
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

    async def follow_files(self, keys: list[Key]) -> None:
        """Without Redis: read again the override files of ``keys`` whose ``stat`` changed
        since they were last read (another process changed them), or that were read more
        than :data:`FILE_MAX_AGE_S` ago."""
        if not keys:
            return
        generations = [self._generation.get(k, 0) for k in keys]
        now = time.monotonic()

        def changed() -> list[tuple[Key, int, FileStat, ThresholdOverride | None]]:
            out = []
            for key, generation in zip(keys, generations):
                stat = file_stat(self._path(*key))  # before the read, as in get()
                seen = self._file_seen.get(key)
                if seen is None or seen[0] != stat or now - seen[1] >= FILE_MAX_AGE_S:
                    out.append((key, generation, stat, self._read_file(*key)))
            return out

        for key, generation, stat, override in await asyncio.to_thread(changed):
            if self._generation.get(key, 0) != generation:
                continue  # this process changed it while the file was read: the change wins
            if key in self._known and self._known[key] != override:
                log.info("%s/%s: threshold override %s by another process", key[0], key[1],
                         "removed" if override is None else f"set to {override.threshold:.6g}")
            self._known[key] = override
            self._file_seen[key] = (stat, now)

    async def _sync_loop(self, serving: Callable[[], dict[str, str]]) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                keys = sorted(serving().items())
                if self.conn is not None:
                    await self.refresh(keys)
                else:
                    await self.follow_files(keys)
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
        write_atomic(path, text, durable=True)  # an operator's decision: it survives a power cut

    def _file_is_durable(self, category: str, version: str) -> bool:
        """Whether changes write this version's override file (its folder is writable): then
        the file holds every change, DELETEs included."""
        return folder_writable(self._path(category, version).parent)

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        """Hold ``<dir>/.threshold.lock`` (exclusive) for one whole change: Redis and file."""
        if self.root != self.store:
            # Its own tree (compose, k8s: /review/.thresholds) may not exist before the first
            # change: made here, or the first change would run without the lock.
            with contextlib.suppress(OSError):  # a read-only volume: the write reports it
                self.root.mkdir(parents=True, exist_ok=True)
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
        return read_override(self._path(category, version), version)
