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

What leaves the store is let go of once gone for ``store_removal_grace_s`` (what the store
says, and when: :mod:`service.pipeline.store_watch`): a served, unpinned version gives way to
the newest remaining one that loads, and a category gone from the store (or left with no
version) is retired: unknown here (404, saying when it left), its model drained like a
swapped-out one, until its folder comes back and the watch loads it as a new category.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from models.manifest import CATEGORY_PATTERN, list_versions
from service.config import Settings
from service.engines.factory import load_engine
from service.pipeline.loaded_model import EngineFactory, LoadedModel, build_version
from service.pipeline.registry_errors import RegistryError, UnknownCategory, VersionNotFound
from service.pipeline.registry_view import EVALUATION_ASSETS, RegistryView
from service.pipeline.store_watch import (FailedVersion, Removals, Served, StoreLook, changed_since, failed_now,
                                          folder_state, look, still_failed, watch_candidates)

log = logging.getLogger(__name__)


class ModelRegistry(RegistryView):
    """Loaded engines by category; safe to read from the event loop at any time."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = load_engine,
                 on_swap: Callable[[LoadedModel], None] | None = None) -> None:
        super().__init__(settings)
        self._engine_factory = engine_factory
        self._on_swap = on_swap
        # Called with the category after every failed load (start-up, watch, reload): the
        # service counts them (msflow_model_load_failures_total, which an alert watches).
        self.on_load_failure: Callable[[str], None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # Called with a model that stops serving with nothing in its place (a failed follow of
        # an operator's reload, :meth:`_follow_failed`): the runtime lets go of what it holds.
        self.on_drop: Callable[[LoadedModel], None] | None = None
        # Called with a category retired (its folder left the store) and the model it served, if
        # any: the runtime drains it as at a swap and lets its metrics go.
        self.on_retire: Callable[[str, LoadedModel | None], None] | None = None
        self.removals = Removals(settings.store_removal_grace_s)

    # ------------------------------------------------------------------ discovery
    def scan(self) -> list[str]:
        """Categories in the store now: folders named like a category that hold a complete version."""
        return look(self.store).serveable()

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

    # ------------------------------------------------------------------ loading
    async def load_all(self) -> None:
        """Load and warm every discovered category, one after the other (they share the
        accelerator; parallel loads would only compete): the pinned version, else the newest
        that loads. Failures are recorded, not raised."""
        for category in list(self._categories):
            async with self._lock(category):
                await self._load_newest(category, self._candidates(category, initial=True))

    async def refresh(self) -> list[str]:
        """Follow the store since the last look: load new categories, and newer versions of
        unpinned ones (the newest that loads); let go of what has left it for the grace
        period (:meth:`_retire`; a served, unpinned version gone: the newest remaining one).
        A version that failed to load is not tried again by the watch (an explicit reload
        does) until its folder changes (a copy caught half done, completed since). Raises
        ``OSError`` when the store cannot be listed (nothing is let go of). Returns the
        categories (re)loaded."""
        # In a thread: on a network file system (NFS, EFS) every listing and stat is a round
        # trip, and a scan on the event loop held every request in flight for all of them. The
        # folders of failed versions are looked at there too (from a copy of their record).
        failed = {category: dict(records) for category, records in self._failed_versions.items() if records}

        def scan() -> tuple[StoreLook, dict[str, dict[str, FailedVersion]]]:
            return look(self.store), {c: changed_since(self.store / c, records) for c, records in failed.items()}
        try:
            seen, changed = await asyncio.to_thread(scan)
        except OSError:
            self.removals.unknown()
            raise
        self._forget_failed_versions_gone(seen)
        pins = set(self._pins) | set(self.settings.pinned_versions)
        # A model loaded pinned whose pin ended since (:meth:`end_pin`) is watched as unpinned.
        gone = self.removals.check(seen, self.categories, {c: Served(m.version, self.pinned(c, m))
                                                           for c, m in self._models.items()}, pins)
        for category in gone.categories:
            async with self._lock(category):
                self._retire(category)
        loaded = []
        for category in seen.serveable():
            new, fall_back = category not in self.categories, category in gone.versions
            listed = seen.versions(category)  # this scan's listing: the store is not read again
            looked = changed.get(category, {})
            if not self._candidates(category, initial=new, served_gone=fall_back, versions=listed, changed=looked):
                continue
            async with self._lock(category):
                # Again: an operator's reload ?version= this waited for may have pinned it since.
                model, _ = await self._load_newest(category, self._candidates(
                    category, initial=new, served_gone=fall_back, versions=listed, changed=looked))
                if model is not None:
                    loaded.append(category)
        return loaded

    def _forget_failed_versions_gone(self, seen: StoreLook) -> None:
        """Failed versions no longer in the store are forgotten: every scan reads the folder of
        each one recorded, and nothing showed them (only the versions listed are). A category
        this scan could not list, or whose folder is gone (its retirement forgets it), keeps its
        records."""
        for category, records in self._failed_versions.items():
            listed = seen.categories.get(category)
            if listed is not None:
                for version in [v for v in records if v not in listed]:
                    del records[version]

    def _candidates(self, category: str, initial: bool = False, unpinning: bool = False,
                    served_gone: bool = False, versions: list[str] | None = None,
                    changed: dict[str, FailedVersion] | None = None) -> list[str]:
        """The versions of ``category`` to try, in order (newest first), until one loads.
        A settings pin: that version alone (at start-up, or a category new to the watch).
        Else :func:`~service.pipeline.store_watch.watch_candidates` of ``versions`` (the store's
        complete versions, listed now when not given; ``served_gone``: the served version left
        the store for the grace period); nothing while an operator's reload ?version= pins it,
        served or not (``unpinning``: the operator's reload that ends the pin)."""
        pinned = self.settings.pinned_versions.get(category)
        if pinned is not None:
            return [pinned] if initial else []
        if category in self._pins and not unpinning:
            return []
        current = self._models.get(category)
        listed = list_versions(self.store / category) if versions is None else versions
        records = self._failed_versions.get(category, {})
        # ``changed``: what the watch's scan found of the failed versions' folders (in its thread).
        failed = still_failed(self.store / category, records) if changed is None else failed_now(records, changed)
        return watch_candidates(listed, current.version if current else None, failed, served_gone)

    def _retire(self, category: str) -> None:
        """``category`` left the store for the grace period (under its lock): whatever serves it
        stops (requests already on it finish: the runtime drains it as at a swap), and it is
        unknown here, saying since when, until its folder comes back (a new category then)."""
        model = self._models.pop(category, None)
        for about in (self._failed, self._failed_versions, self._unhealthy, self._pins):
            about.pop(category, None)
        if category in self._categories:
            self._categories.remove(category)
        self._retired[category] = datetime.now(timezone.utc)
        log.warning("%s: retired: it left the model store (gone on every scan for %.3g s)%s; unknown here until "
                    "its folder is back", category, self.settings.store_removal_grace_s,
                    f"; version {model.version} stops serving" if model is not None else "")
        if self.on_retire is not None:
            self.on_retire(category, model)

    async def end_pin(self, category: str, still: Callable[[], bool] = lambda: True) -> bool:
        """Another front end's store watch retired ``category`` and the operator's pin with it
        (multi-process mode): the pin ends here too, if ``still`` holds once the category's lock
        is had (a reload in flight finishes first, and one made since is not ended). What serves
        serves on, watched as unpinned: the newest version loads if the folder is back, else the
        category retires here after this front end's own grace. A settings pin is no operator's."""
        async with self._lock(category):
            if category not in self._pins or category in self.settings.pinned_versions or not still():
                return False
            version = self._pins.pop(category)
        log.info("%s: the pin to version %s ends: another front end retired the category", category, version)
        return True

    async def _load_newest(self, category: str, versions: list[str],
                           record_failure: bool = True) -> tuple[LoadedModel | None, Exception | None]:
        """Swap in the first of ``versions`` that loads (under the category's lock): the model,
        or None and the first (newest) version's error. Each one that fails is logged and (with
        ``record_failure``) not tried again by the watch; when none loads and nothing serves the
        category, it is ``failed`` with that first error."""
        first_error: Exception | None = None
        for version in versions:
            try:
                return await self._swap_in(category, version, pin=category in self.settings.pinned_versions,
                                           record_failure=record_failure), None
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
        """Blocking: :func:`~service.pipeline.loaded_model.build_version` of the version's folder."""
        return build_version(self.settings, self._engine_factory, self.store / category / version, pinned, in_force)

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
        is refused instead, as in one process). That holds for a pin whose whole category
        folder is away (a front end started during a removal's grace, greeted with the pin the
        running ones serve on from memory): served from the engine process's memory or failed,
        and known here, so that the store watch retires it with the others if it stays away."""
        held_away = in_force and version is not None and category not in self._models
        if not CATEGORY_PATTERN.fullmatch(category) or not ((self.store / category).is_dir() or held_away):
            if category in self._models:  # not "unknown ...; known: <it>": it serves, from memory
                grace, watched = self.settings.store_removal_grace_s, self.settings.store_poll_s > 0
                until = (f"the store watch retires it ({grace:.3g} s after it left)" if grace >= 0 and watched
                         else "this server restarts")
                raise RegistryError(f"{category} is no longer in the model store; version "
                                    f"{self._models[category].version} serves on until {until}")
            raise UnknownCategory(category, self.categories, self.removed_note(category))
        async with self._lock(category):  # two reloads of one category must not race to the swap
            if version is None and category in self._pins and category not in self.settings.pinned_versions:
                return await self._unpin(category, in_force)
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

    async def _unpin(self, category: str, in_force: bool) -> LoadedModel:
        """End an operator's pin (a reload with no version; under the lock): serve what the watch
        would, the newest version that loads, the pinned one included. Trying the newest alone,
        a broken newest export kept the pin (422) and a front end following the unpin dropped
        the category. None loads: the pin holds, or ends all the same where followed. Failures
        are not recorded (an engine process away fails every version; the watch records them)."""
        model, error = await self._load_newest(category, self._candidates(category, unpinning=True, served_gone=True),
                                               record_failure=False)
        if model is not None:
            return model
        if in_force:
            self._follow_failed(category, None)
        raise error or RegistryError(f"{category}: no version in the store to serve once unpinned")

    async def _swap_in(self, category: str, version: str | None, pin: bool = True,
                       record_failure: bool = False, in_force: bool = False) -> LoadedModel:
        """Build and warm, then swap; under the category's lock. ``pin``: a given ``version``
        pins the category (an operator's reload ?version=), unless the watch chose it.
        ``record_failure``: a version that fails is kept as failed (the watch's and start-up's
        choices; an operator's named reload is answered instead), before the failure callback."""
        started = time.perf_counter()
        chosen, tried = version, None
        try:
            chosen, pinned = self._resolve_version(category, version, in_force)
            if record_failure:  # before the load: a folder that changes during it is tried again
                tried = await asyncio.to_thread(folder_state, self.store / category / chosen)
            model = await asyncio.to_thread(self._build, category, chosen, pinned and pin, in_force)
        except Exception as exc:
            if in_force:
                self._follow_failed(category, version)
            if record_failure and chosen is not None:
                self._failed_versions.setdefault(category, {})[chosen] = FailedVersion(self.public_message(exc), tried)
            if category not in self._models:
                self._failed[category] = self.public_message(exc)
            self._know(category)
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
        self._know(category)
        if self._on_swap is not None:
            self._on_swap(model)
        log.info("%s: serving version %s on %s (%s; warm-up %.0f ms, load %.1f s)", category, model.version,
                 model.engine.name, f"was {previous.version}" if previous else "first load", model.warmup_ms,
                 time.perf_counter() - started)
        if previous is not None and previous.version != model.version:
            self._say_dropped_override(previous, model)
        return model

    def _know(self, category: str) -> None:
        """``category`` is in the store (again, after a retirement: no longer "removed")."""
        if category not in self._categories:
            self._categories.append(category)
        self._retired.pop(category, None)

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


__all__ = ["EVALUATION_ASSETS", "ModelRegistry"]
