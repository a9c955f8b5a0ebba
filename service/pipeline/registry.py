"""Which engine serves each category, and swapping it safely.

At start-up the registry discovers every category folder of the model store, picks the
newest version (or the pinned one), checks the manifest belongs where it lies, builds the
engine with :func:`service.engines.factory.load_engine` and warms it with one full batch (first
calls allocate memory, pick kernels and build TensorRT contexts; a customer request must
not pay that). The service is ready only when every category is warm.

``reload`` builds and warms the new engine completely *before* swapping one dict entry, so
the swap is atomic: batches already running finish on the old engine, the next batch
uses the new one, and no request fails. A failed reload leaves the old engine serving.

Without a pin, start-up and the store watch serve the newest version that *loads*: a newest
version that fails is recorded and the next older one is tried, so a replica started after
a broken export serves what the replicas running before it kept serving, rather than
nothing for that category.

A pin (the settings', or an operator's reload ?version=) holds while it cannot be served:
nothing else is loaded for the category until a reload changes it. A pinned version whose
folder left the store serves on from memory; a pin followed from elsewhere (``in_force``:
another front end's reload, the engine process back) is still served where the engine
factory can have the version without its folder (the engine process holds it), else the
category fails (:class:`PinnedVersionRemoved`), never the newest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.build_progress import BuildProgress, read_progress
from models.manifest import CATEGORY_PATTERN, MANIFEST, Manifest, list_versions
from service.config import Settings
from service.engines.base import Engine
from service.engines.factory import load_engine
from service.pipeline.loaded_model import EngineFactory, LoadedModel, check_placed, warm_engine
from service.pipeline.registry_errors import (ModelNotLoaded, PinnedVersionRemoved, RegistryError, UnknownCategory,
                                             VersionNotFound)
from service.schemas import ModelInfo

log = logging.getLogger(__name__)

# Files `msflow eval` made that export copies into a version folder; the only files of a
# version GET /v1/models/{category}/assets/{name} serves.
EVALUATION_ASSETS: dict[str, str] = {"roc.png": "image/png", "examples.png": "image/png",
                                     "report.json": "application/json"}


class ModelRegistry:
    """Loaded engines by category; safe to read from the event loop at any time."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = load_engine,
                 on_swap: Callable[[LoadedModel], None] | None = None) -> None:
        self.settings = settings
        self.store = Path(settings.model_store)
        self._engine_factory = engine_factory
        self._on_swap = on_swap
        # Called with the category after every failed load (start-up, watch, reload): the
        # service counts them (msflow_model_load_failures_total, which an alert watches).
        self.on_load_failure: Callable[[str], None] | None = None
        self._models: dict[str, LoadedModel] = {}
        self._failed: dict[str, str] = {}
        self._categories: list[str] = []
        self._locks: dict[str, asyncio.Lock] = {}
        # category -> version -> why it failed to load (the watch skips them; /v1/models and
        # msflow_model_versions_failed show them while an older version serves)
        self._failed_versions: dict[str, dict[str, str]] = {}
        self._unhealthy: dict[str, str] = {}  # category -> why its serving version looks broken (cleared on swap)
        # category -> the version a pin holds it to: kept while that version cannot be served
        # (lost, or a followed pin that failed), so that nothing else is loaded in its place.
        self._pins: dict[str, str] = {}
        # Called with a model that stops serving with nothing in its place (a failed follow of
        # an operator's reload, :meth:`_follow_failed`): the runtime lets go of what it holds.
        self.on_drop: Callable[[LoadedModel], None] | None = None
        # service.pipeline.thresholds.ThresholdOverrides (set by ServiceState): describe() shows overrides
        self.thresholds: Any = None

    # ------------------------------------------------------------------ discovery
    def scan(self) -> list[str]:
        """Categories in the store now: folders named like a category that hold a complete version."""
        return sorted(p.name for p in self.store.iterdir()
                      if p.is_dir() and CATEGORY_PATTERN.fullmatch(p.name) and list_versions(p))

    def discover(self) -> list[str]:
        """Categories in the store (folders named like a category that hold a version).

        Raises :class:`RegistryError` when the store is missing, or empty while the store is
        not watched (``store_poll_s`` 0): nothing would ever be served. A watched empty store
        is fine: categories appear as they are exported (the demo builds them while serving).
        """
        if not self.store.is_dir():
            raise RegistryError(f"model store {self.store} does not exist (set MSFLOW_MODEL_STORE)")
        found = self.scan()
        if not found and not self.settings.store_poll_s:
            raise RegistryError(f"model store {self.store} holds no <category>/<version>/manifest.json")
        for category, version in self.settings.pinned_versions.items():
            if category not in found:
                raise RegistryError(f"pinned category {category!r} is not in the model store {self.store}")
            if version not in list_versions(self.store / category):
                # A wrong pin is a deployment mistake: fail start-up instead of never getting ready.
                raise VersionNotFound(f"pinned version {category}/{version} is not in the model store {self.store}")
        self._categories = found
        return list(found)

    @property
    def categories(self) -> list[str]:
        """Every category known (loaded, loading or failed), sorted."""
        return sorted(set(self._categories) | set(self._models))

    @property
    def ready(self) -> bool:
        """True when something serves and nothing is still loading. A category whose load
        failed is reported (``failed``, per-category status) and skipped: one broken export
        must not take the replica's other categories out of rotation."""
        return bool(self._models) and all(c in self._models or c in self._failed for c in self.categories)

    def status(self) -> dict[str, str]:
        """Per category: ``serving <version>``, ``loading`` or ``failed``."""
        return {c: (f"serving {self._models[c].version}" if c in self._models
                    else "failed" if c in self._failed else "loading") for c in self.categories}

    def build_progress(self) -> BuildProgress | None:
        """What a builder writing into the store reports (advisory: None when absent or unusable)."""
        return read_progress(self.store)

    def mark_unhealthy(self, category: str, why: str) -> None:
        """The serving version misbehaves (non-finite outputs): reported in readiness until a
        new version is swapped in. It keeps serving: the bad images get an error each."""
        if category not in self._unhealthy:
            log.error("%s: %s", category, why)
        self._unhealthy[category] = why

    @property
    def unhealthy(self) -> dict[str, str]:
        return dict(self._unhealthy)

    def public_message(self, exc: BaseException) -> str:
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

    def lost(self, category: str, version_dir: str, exc: Exception) -> None:
        """The version serving ``category`` (``version_dir``) can no longer run: a new engine
        process could not load it again. The category fails as a failed load does (reported,
        skipped by readiness, retried like one: when the engine process connects again, or by
        the store watch), while the others serve on. Nothing if another version serves it now."""
        model = self._models.get(category)
        if model is None or str(model.version_dir) != version_dir:
            return
        del self._models[category]
        self._unhealthy.pop(category, None)  # about the version served, which no longer is
        self._failed[category] = self.public_message(exc)
        log.error("%s: version %s can no longer be served: %s", category, model.version, exc)

    def get(self, category: str) -> LoadedModel:
        model = self._models.get(category)
        if model is not None:
            return model
        if category in self._categories:
            why = self._failed.get(category)
            raise ModelNotLoaded(f"{category}: " + (f"failed to load: {why}" if why else "still loading"))
        raise UnknownCategory(category, self.categories)

    def engine(self, category: str) -> Engine:
        """The engine serving ``category`` now (the batcher's engine provider)."""
        return self.get(category).engine

    # ------------------------------------------------------------------ loading
    async def load_all(self) -> None:
        """Load and warm every discovered category, one after the other (they share the
        accelerator; parallel loads would only compete): the pinned version, else the newest
        that loads. Failures are recorded, not raised."""
        for category in list(self._categories):
            async with self._lock(category):
                await self._load_newest(category, self._candidates(category, initial=True))

    async def refresh(self) -> list[str]:
        """Load what appeared in the store since the last look: new categories, and newer
        versions of unpinned ones (the newest that loads). A version that failed to load is
        not tried again by the watch (an explicit reload does). Returns the categories (re)loaded."""
        loaded = []
        for category in self.scan():
            if not self._candidates(category):
                continue
            async with self._lock(category):
                # Again: an operator's reload ?version= this waited for may have pinned it since.
                model, _ = await self._load_newest(category, self._candidates(category))
                if model is not None:
                    loaded.append(category)
        return loaded

    def _candidates(self, category: str, initial: bool = False, unpinning: bool = False) -> list[str]:
        """The versions of ``category`` to try, in order (newest first), until one loads.
        A settings pin: that version alone (at start-up). Else the versions newer than the one
        served (all of them when none is, or when the served one left the store), skipping
        those that failed before; nothing while an operator's reload ?version= pins it, served
        or not (``unpinning``: the operator's reload that ends the pin)."""
        pinned = self.settings.pinned_versions.get(category)
        if pinned is not None:
            return [pinned] if initial else []
        if category in self._pins and not unpinning:
            return []
        current = self._models.get(category)
        failed = self._failed_versions.get(category, {})
        out = []
        for version in reversed(list_versions(self.store / category)):  # empty: removed meanwhile
            if current is not None and version == current.version:
                break  # served already, and every older one is older than what serves
            if version not in failed:
                out.append(version)
        return out

    async def _load_newest(self, category: str, versions: list[str]) -> tuple[LoadedModel | None, Exception | None]:
        """Swap in the first of ``versions`` that loads (under the category's lock): the model,
        or None and the first (newest) version's error. Each one that fails is logged and not
        tried again by the watch; when none loads and nothing serves the category, it is
        ``failed`` with that first error."""
        first_error: Exception | None = None
        for version in versions:
            try:
                return await self._swap_in(category, version, pin=category in self.settings.pinned_versions,
                                           record_failure=True), None
            except Exception as exc:  # recorded by _swap_in; the next older version is tried
                log.error("cannot load %s version %s: %s%s", category, version, exc,
                          "; trying an older one" if version != versions[-1] else "")
                first_error = first_error or exc
        if first_error is not None and category not in self._models:
            self._failed[category] = self.public_message(first_error)
        return None, first_error

    def _lock(self, category: str) -> asyncio.Lock:
        return self._locks.setdefault(category, asyncio.Lock())

    def _resolve_version(self, category: str, version: str | None, in_force: bool = False) -> tuple[str, bool]:
        """The version to load and whether it is pinned. ``in_force``: a version no longer in
        the store is still tried (see :meth:`reload`)."""
        versions = list_versions(self.store / category)
        pinned = self.settings.pinned_versions.get(category)
        wanted = version or pinned
        if wanted is None:
            if not versions:
                raise RegistryError(f"{category}: no version with a manifest in {self.store / category}")
            return versions[-1], False
        if wanted not in versions and not in_force:
            raise VersionNotFound(f"{category}: version {wanted!r} not in the store "
                                  f"(have {', '.join(versions) or 'none'})")
        return wanted, wanted == pinned or version is not None

    def _build(self, category: str, version: str, pinned: bool, in_force: bool = False) -> LoadedModel:
        """Blocking: read and check the manifest, build the engine, warm it. A pin in force
        whose folder is gone is built if the engine factory still can (the engine process
        holds it, with its manifest), and checked on the engine's manifest."""
        version_dir = self.store / category / version
        removed = in_force and not (version_dir / MANIFEST).is_file()
        if not removed:
            manifest = Manifest.read(version_dir)
            check_placed(version_dir, manifest, category, version)
        s = self.settings
        try:
            engine = self._engine_factory(version_dir, kind=s.engine, device=s.device, threads=s.intra_op_threads,
                                          max_batch_size=s.max_batch_size, tensorrt_cache_dir=s.ort_tensorrt_cache_dir,
                                          tensorrt_cache_max_bytes=s.ort_tensorrt_cache_max_bytes)
        except Exception as exc:
            if not removed:
                raise
            raise PinnedVersionRemoved(
                f"{category}: pinned version {version} was removed from the model store and no process of this "
                f"server holds it any more; nothing else serves {category} while the pin holds: reload it "
                f"(POST /v1/models/{category}/reload, ?version= to pin another); loading it: {exc}") from exc
        try:
            if removed:
                check_placed(version_dir, engine.manifest, category, version)
            warmup_ms = warm_engine(engine, self.settings.max_batch_size)
        except BaseException:
            release = getattr(engine, "close", None)  # an engine held elsewhere (engine process) lets go
            if release is not None:
                release()
            raise
        return LoadedModel(category=category, version=version, version_dir=version_dir, engine=engine,
                           loaded_at=datetime.now(timezone.utc), warmup_ms=warmup_ms, pinned=pinned)

    async def retry(self, category: str) -> LoadedModel:
        """Load ``category`` again after its load failed (the engine process is back): the
        version a pin holds it to, else the newest that loads."""
        pin = self._pins.get(category, self.settings.pinned_versions.get(category))
        return await self.reload(category, pin, in_force=pin is not None)

    async def reload(self, category: str, version: str | None = None, *, in_force: bool = False) -> LoadedModel:
        """(Re)load ``category`` (newest, pinned or the given ``version``) and swap it in once warm.

        Where nothing serves the category (its loads failed) and no version is named or
        pinned, every version is tried again, newest first (as at start-up): the operator's
        retry, or the engine process back, brings the newest that loads.

        ``in_force``: ``version`` is a pin already in force on this server (another front
        end's reload followed, a retry), not an operator's new choice: if its folder left the
        store it is still served where the engine factory can have it without (the engine
        process holds it), and if it cannot be served the pin holds all the same: the category
        fails rather than serve another version (an operator's new reload of a removed version
        is refused instead, as in one process)."""
        if not CATEGORY_PATTERN.fullmatch(category) or not (self.store / category).is_dir():
            if category in self._models:  # not "unknown ...; known: <it>": it serves, from memory
                raise RegistryError(f"{category} is no longer in the model store; version "
                                    f"{self._models[category].version} serves on until this server restarts")
            raise UnknownCategory(category, self.categories)
        async with self._lock(category):  # two reloads of one category must not race to the swap
            if in_force and version is None:
                self._pins.pop(category, None)  # an unpin followed: it ends the pin, loaded or not
            if version is None and category not in self._models and category not in self.settings.pinned_versions:
                self._failed_versions.pop(category, None)
                model, error = await self._load_newest(category, self._candidates(category, unpinning=True))
                if model is not None:
                    return model
                if error is not None:
                    raise error
            return await self._swap_in(category, version, in_force=in_force)

    async def _swap_in(self, category: str, version: str | None, pin: bool = True,
                       record_failure: bool = False, in_force: bool = False) -> LoadedModel:
        """Build and warm, then swap; under the category's lock. ``pin``: a given ``version``
        pins the category (an operator's reload ?version=), unless the watch chose it.
        ``record_failure``: a version that fails is kept as failed (the watch's and start-up's
        choices; an operator's named reload is answered instead), before the failure callback."""
        started = time.perf_counter()
        chosen = version
        try:
            chosen, pinned = self._resolve_version(category, version, in_force)
            model = await asyncio.to_thread(self._build, category, chosen, pinned and pin, in_force)
        except Exception as exc:
            if in_force:
                self._follow_failed(category, version)
            if record_failure and chosen is not None:
                self._failed_versions.setdefault(category, {})[chosen] = self.public_message(exc)
            if category not in self._models:
                self._failed[category] = self.public_message(exc)
            if category not in self._categories:
                self._categories.append(category)
            if self.on_load_failure is not None and not isinstance(exc, VersionNotFound):
                self.on_load_failure(category)
            raise
        self._failed_versions.get(category, {}).pop(chosen, None)  # it loads now (an explicit reload)
        previous = self._models.get(category)
        self._models[category] = model  # the atomic swap: the next batch sees the new engine
        if model.pinned:
            self._pins[category] = model.version
        else:
            self._pins.pop(category, None)
        self._failed.pop(category, None)
        self._unhealthy.pop(category, None)
        if category not in self._categories:
            self._categories.append(category)
        if self._on_swap is not None:
            self._on_swap(model)
        log.info("%s: serving version %s on %s (%s; warm-up %.0f ms, load %.1f s)", category, model.version,
                 model.engine.name, f"was {previous.version}" if previous else "first load", model.warmup_ms,
                 time.perf_counter() - started)
        if previous is not None and previous.version != model.version:
            self._say_dropped_override(previous, model)
        return model

    def _follow_failed(self, category: str, version: str | None) -> None:
        """A reload in force here (another front end's, followed; a retry) failed: what it chose
        holds all the same. A pin is kept (nothing else is loaded in its place), an unpin ends
        the pin, and a version served that the reload moved away from stops serving: the
        category fails (503 ``model_not_loaded``) and is retried as a failed load is, when the
        engine process connects again. Before, a follow cut off by the engine process going
        away left the version pinned or unpinned away from serving here for good (the replay
        at the next connection was one this front end had recorded as followed)."""
        if version is None:
            self._pins.pop(category, None)
        else:
            self._pins[category] = version
        model = self._models.get(category)
        if model is None or (model.version == version if version is not None else not model.pinned):
            return
        del self._models[category]
        self._unhealthy.pop(category, None)
        log.error("%s: version %s stops serving here: %s", category, model.version,
                  f"the pin to version {version} in force could not be followed" if version is not None
                  else "the end of its pin could not be followed")
        if self.on_drop is not None:
            self.on_drop(model)

    def _say_dropped_override(self, previous: LoadedModel, model: LoadedModel) -> None:
        """Overrides belong to one version (another version may score on another scale), so an
        operator's threshold stops deciding verdicts when a new version is swapped in: say so
        where the operator looks, rather than let verdicts move without a word."""
        if self.thresholds is None:
            return
        dropped = self.thresholds.for_manifest(previous.manifest)
        if dropped is None or self.thresholds.for_manifest(model.manifest) is not None:
            return
        log.warning("%s: the threshold override of version %s (%.6g) does not apply to version %s, which "
                    "decides at its calibrated threshold %.6g; set one for it with PUT threshold if needed",
                    model.manifest.category, previous.version, dropped.threshold, model.version,
                    model.manifest.calibration.threshold)

    # ------------------------------------------------------------------ description
    def describe(self, category: str) -> ModelInfo:
        m = self.get(category)
        man = m.manifest
        override = self.thresholds.for_manifest(man) if self.thresholds is not None else None
        effective = self.thresholds.calibration(man) if self.thresholds is not None else man.calibration
        return ModelInfo(
            category=category, version=m.version, engine=m.engine.name, input_size=man.input_size,
            backbone=man.backbone, threshold=override.threshold if override else man.calibration.threshold,
            calibrated_threshold=man.calibration.threshold, threshold_override=override,
            ng_threshold=effective.ng_bound, calibrated_ng_threshold=man.calibration.ng_bound,
            assets=[name for name in EVALUATION_ASSETS if (m.version_dir / name).is_file()],
            calibration=man.calibration.model_dump(mode="json"), metrics=man.metrics, created_at=man.created_at,
            loaded_at=m.loaded_at, warmup_ms=round(m.warmup_ms, 3), pinned=m.pinned,
            available_versions=list_versions(self.store / category),
            failed_versions=self.failed_versions(category),
        )

    def failed_versions(self, category: str) -> dict[str, str]:
        """Versions of ``category`` still in the store that failed to load here, with why: the
        watch does not retry them, so they stay broken until a newer export or a reload."""
        failed = self._failed_versions.get(category, {})
        return {v: failed[v] for v in list_versions(self.store / category) if v in failed}

    def describe_all(self) -> list[ModelInfo]:
        return [self.describe(c) for c in self.categories if c in self._models]

    def serving(self) -> dict[str, str]:
        """category -> version for every loaded category."""
        return {c: m.version for c, m in sorted(self._models.items())}
