"""What the model registry knows of each category, and says about it: the read side of
:class:`~service.pipeline.registry.ModelRegistry` (which loads, swaps, pins and retires).

Per category: the version served (:meth:`RegistryView.get`, ``serving``), a failed load and
why, versions that failed while another serves, a version that misbehaves (``unhealthy``),
the pin that holds it, and when the store watch retired it (``removed_note``: what a 404 says
of a category whose folder left the store). Readiness, ``/readyz``'s statuses and
``GET /v1/models`` are read from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from models.build_progress import BuildProgress, read_progress, status_path
from models.manifest import version_folders
from service.config import Settings
from service.engines.base import Engine
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.registry_errors import ModelNotLoaded, UnknownCategory
from service.pipeline.store_watch import FailedVersion, version_order
from service.schemas import ModelInfo

log = logging.getLogger("service.pipeline.registry")  # the registry's own log, as before the split

# Files `msflow eval` made that export copies into a version folder; the only files of a
# version GET /v1/models/{category}/assets/{name} serves.
EVALUATION_ASSETS: dict[str, str] = {"roc.png": "image/png", "examples.png": "image/png",
                                     "report.json": "application/json"}


class RegistryView:
    """The registry's state by category and every question asked of it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Path(settings.model_store)
        self._models: dict[str, LoadedModel] = {}
        self._failed: dict[str, str] = {}
        self._categories: list[str] = []
        # Categories new to the store watch, found by its scan and waiting for their first load
        # (they load one after the other): ``loading``, not unknown, meanwhile.
        self._arriving: set[str] = set()
        # category -> version -> why it failed to load and what its folder held (the watch skips
        # it until that changes; /v1/models and msflow_model_versions_failed show them while an
        # older version serves)
        self._failed_versions: dict[str, dict[str, FailedVersion]] = {}
        # category -> version -> why its folder cannot be read, as the watch's last scan found
        # (not a version the store lists, so never tried: shown failed until readable or gone)
        self._unreadable: dict[str, dict[str, str]] = {}
        self._unhealthy: dict[str, str] = {}  # category -> why its serving version looks broken (cleared on swap)
        # category -> the version a pin holds it to: kept while that version cannot be served
        # (lost, or a followed pin that failed), so that nothing else is loaded in its place.
        self._pins: dict[str, str] = {}
        self._retired: dict[str, datetime] = {}  # category -> when the watch retired it (until it is back)
        # service.pipeline.thresholds.ThresholdOverrides (set by ServiceState): describe() shows overrides
        self.thresholds: Any = None
        # The last read of the build's progress (its file's stat, what it said) and the read
        # under way, which concurrent askers share (build_progress_off_loop).
        self._progress_read: tuple[tuple[int, ...] | None, BuildProgress | None] | None = None
        self._progress_reading: asyncio.Future[BuildProgress | None] | None = None

    @property
    def categories(self) -> list[str]:
        """Every category known (loaded, loading or failed), sorted."""
        return sorted(set(self._categories) | set(self._models) | self._arriving)

    @property
    def ready(self) -> bool:
        """True when something serves and nothing found at start-up is still loading. A
        category whose load failed is reported (``failed``, per-category status) and skipped:
        one broken export must not take the replica's other categories out of rotation; nor
        does one the store watch is loading (``loading`` meanwhile)."""
        return bool(self._models) and all(c in self._models or c in self._failed or c in self._arriving
                                          for c in self.categories)

    def status(self) -> dict[str, str]:
        """Per category: ``serving <version>``, ``loading`` or ``failed``."""
        return {c: (f"serving {self._models[c].version}" if c in self._models
                    else "failed" if c in self._failed else "loading") for c in self.categories}

    def build_progress(self) -> BuildProgress | None:
        """What a builder writing into the store reports (advisory: None when absent or unusable)."""
        return read_progress(self.store)

    async def build_progress_off_loop(self) -> BuildProgress | None:
        """:meth:`build_progress` read in a thread, one read at a time however many ask (they
        share it), parsed again only when the file changed. Every inspect request naming a
        category not in the store asks (503 ``model_building`` or 404): on the event loop, each
        such request held every request in flight for an open and a parse of up to 64 KiB, and
        on a network file system for its round trips (a hung NFS mount: for good)."""
        if self._progress_reading is None:
            self._progress_reading = asyncio.ensure_future(self._read_build_progress())
        return await asyncio.shield(self._progress_reading)  # an asker gone does not cancel the others' read

    async def _read_build_progress(self) -> BuildProgress | None:
        try:
            return await asyncio.to_thread(self._build_progress_if_changed)
        finally:
            self._progress_reading = None

    def _build_progress_if_changed(self) -> BuildProgress | None:
        try:
            st = os.stat(status_path(self.store))
            key: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            key = None
        last = self._progress_read
        if key is not None and last is not None and last[0] == key:
            return last[1]  # written atomically (replaced whole): a change is a new inode or time
        progress = self.build_progress()
        self._progress_read = (key, progress)
        return progress

    def mark_unhealthy(self, category: str, why: str) -> None:
        """The serving version misbehaves (non-finite outputs): reported in readiness until a
        new version is swapped in. It keeps serving: the bad images get an error each."""
        if category not in self._unhealthy:
            log.error("%s: %s", category, why)
        self._unhealthy[category] = why

    @property
    def unhealthy(self) -> dict[str, str]:
        return dict(self._unhealthy)

    def public_message(self, exc: BaseException | str) -> str:
        """``exc``'s text with the store's location replaced by ``<store>``: failures are
        reported to clients (``/readyz``, admin answers), where server paths do not belong."""
        text = str(exc)
        for root in sorted({str(self.store.resolve()), str(self.store)}, key=len, reverse=True):
            if root not in ("", "."):
                text = text.replace(root, "<store>")
        return text

    @property
    def failed(self) -> dict[str, str]:
        return dict(self._failed)

    def get(self, category: str) -> LoadedModel:
        model = self._models.get(category)
        if model is not None:
            return model
        if category in self._categories or category in self._arriving:
            why = self._failed.get(category)
            raise ModelNotLoaded(f"{category}: " + (f"failed to load: {why}" if why else "still loading"))
        raise UnknownCategory(category, self.categories, self.removed_note(category))

    def removed_note(self, category: str) -> str | None:
        """Why ``category`` is unknown when the store watch retired it (None otherwise)."""
        when = self._retired.get(category)
        if when is None:
            return None
        return (f"it was removed from the model store and stopped serving at {when:%Y-%m-%dT%H:%M:%SZ} "
                "(served again once its folder is back)")

    def engine(self, category: str) -> Engine:
        """The engine serving ``category`` now (the batcher's engine provider)."""
        return self.get(category).engine

    def pinned(self, category: str, model: LoadedModel) -> bool:
        """Whether an operator's pin holds ``model``, serving ``category``: loaded pinned, and
        the pin not ended since (multi-process: another front end's store watch retired the
        category, :meth:`~service.pipeline.registry.ModelRegistry.end_pin`). The model keeps
        what it was loaded as (it is frozen, and keys its lane); the pin is the registry's."""
        return model.pinned and (category in self._pins or category in self.settings.pinned_versions)

    def describe(self, category: str) -> ModelInfo:
        """``GET /v1/models/{category}``'s answer, read here (blocking: :meth:`describe_off_loop`)."""
        m = self.get(category)
        return self._describe(category, m, self._store_files(category, m))

    async def describe_off_loop(self, category: str) -> ModelInfo:
        """:meth:`describe`, its reads of the store in a thread: on a network file system
        each listing and ``stat`` is a round trip, and on the event loop they held every
        request in flight (a dashboard polling ``GET /v1/models`` did so every few seconds)."""
        m = self.get(category)
        return self._describe(category, m, await asyncio.to_thread(self._store_files, category, m))

    async def describe_all_off_loop(self) -> list[ModelInfo]:
        """Every served category's :meth:`describe_off_loop`, the store read in one thread call."""
        served = [(c, self._models[c]) for c in self.categories if c in self._models]
        files = await asyncio.to_thread(lambda: [self._store_files(c, m) for c, m in served])
        return [self._describe(c, m, f) for (c, m), f in zip(served, files)]

    def _store_files(self, category: str, m: LoadedModel) -> tuple[list[str], list[str]]:
        """What a description reads of the store: the category's complete versions, and which
        evaluation assets the served version's folder holds."""
        return self._versions(category), [name for name in EVALUATION_ASSETS
                                                      if (m.version_dir / name).is_file()]

    def _describe(self, category: str, m: LoadedModel, files: tuple[list[str], list[str]]) -> ModelInfo:
        versions, assets = files
        man = m.manifest
        override = self.thresholds.for_manifest(man) if self.thresholds is not None else None
        effective = self.thresholds.calibration(man) if self.thresholds is not None else man.calibration
        return ModelInfo(
            category=category, version=m.version, engine=m.engine.name, input_size=man.input_size,
            backbone=man.backbone, threshold=override.threshold if override else man.calibration.threshold,
            calibrated_threshold=man.calibration.threshold, threshold_override=override,
            ng_threshold=effective.ng_bound, calibrated_ng_threshold=man.calibration.ng_bound,
            assets=assets, calibration=man.calibration.model_dump(mode="json"), metrics=man.metrics,
            created_at=man.created_at, loaded_at=m.loaded_at, warmup_ms=round(m.warmup_ms, 3),
            pinned=self.pinned(category, m), available_versions=versions,
            failed_versions=self._failed_among(category, versions),
        )

    def failed_versions(self, category: str) -> dict[str, str]:
        """Versions of ``category`` still in the store that failed to load here, with why: the
        watch does not retry them, so they stay broken until a newer export or a reload."""
        return self._failed_among(category, self._versions(category))

    def _versions(self, category: str) -> list[str]:
        """``category``'s complete versions, in silence: a folder that cannot be read is said
        once by the store watch (:meth:`~service.pipeline.registry.ModelRegistry.refresh`),
        not at every request that lists the versions."""
        return version_folders(self.store / category)[0]

    def _failed_among(self, category: str, versions: list[str]) -> dict[str, str]:
        """The failed versions among ``versions`` (those listed now), and the folders the last
        scan could not read, oldest first."""
        failed = self._failed_versions.get(category, {})
        unreadable = {v: self.public_message(why) for v, why in self._unreadable.get(category, {}).items()}
        out = {v: failed[v].why for v in versions if v in failed} | unreadable
        return {v: out[v] for v in sorted(out, key=version_order)}

    def serving(self) -> dict[str, str]:
        """category -> version for every loaded category."""
        return {c: m.version for c, m in sorted(self._models.items())}


__all__ = ["EVALUATION_ASSETS", "RegistryView"]
