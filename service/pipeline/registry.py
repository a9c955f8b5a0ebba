"""Which engine serves each category, and when that changes: start-up, the store watch, an
operator's reloads and pins, retirement.

At start-up the registry discovers every category folder of the model store, picks the
newest version (or the pinned one), checks the manifest belongs where it lies, builds the
engine with :func:`service.engines.factory.load_engine` and warms it with one full batch (first
calls allocate memory, pick kernels and build TensorRT contexts; a customer request must
not pay that). The service is ready only when every category is warm.

``reload`` builds and warms the new engine completely *before* swapping one dict entry, so
the swap is atomic and a failed reload leaves the old engine serving
(:mod:`service.pipeline.registry_swaps`, the base of :class:`ModelRegistry`: building,
warming and swapping one version, and recording what failed).

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
from collections.abc import Callable
from datetime import datetime, timezone

from models.manifest import CATEGORY_PATTERN
from service.config import Settings
from service.engines.factory import load_engine
from service.pipeline.loaded_model import EngineFactory, LoadedModel
from service.pipeline.registry_errors import RegistryError, UnknownCategory, VersionNotFound
from service.pipeline.registry_swaps import VersionSwaps
from service.pipeline.registry_view import EVALUATION_ASSETS
from service.pipeline.store_watch import (FailedVersion, Gone, ManifestKey, Removals, Served, StoreLook, changed_since,
                                          failed_now, look, served_replaced, still_failed, watch_candidates)

log = logging.getLogger(__name__)


class ModelRegistry(VersionSwaps):
    """Loaded engines by category; safe to read from the event loop at any time."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory = load_engine,
                 on_swap: Callable[[LoadedModel], None] | None = None) -> None:
        super().__init__(settings, engine_factory, on_swap)
        # Called with a category retired (its folder left the store) and the model it served, if
        # any: the runtime drains it as at a swap and lets its metrics go.
        self.on_retire: Callable[[str, LoadedModel | None], None] | None = None
        self.removals = Removals(settings.store_removal_grace_s)
        # category -> (the model served, when loaded; its manifest's key found to need nothing):
        # the watch reads a served version's manifest again only once its key changed.
        self._manifests_seen: dict[str, tuple[datetime, ManifestKey]] = {}
        # Called with a known category whose failed versions changed without a load (a folder
        # found unreadable, readable again, or gone): the service sets msflow_model_versions_failed.
        self.on_failed_versions_changed: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ discovery
    def scan(self) -> list[str]:
        """Categories in the store now: folders named like a category that hold a complete version."""
        seen = look(self.store)
        self._note_unreadable(seen)
        return seen.serveable()

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
            if version not in self._versions(category):
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
        # Unpinned versions served, whose folder may hold another version since (a pin holds
        # what it loaded, as when its folder is removed).
        watched = {c: m for c, m in self._models.items() if not self.pinned(c, m)}
        known_keys = {c: key for c, (loaded_at, key) in self._manifests_seen.items()
                      if c in watched and watched[c].loaded_at == loaded_at}

        def scan() -> tuple[StoreLook, dict[str, dict[str, FailedVersion]], dict[str, tuple[ManifestKey | None, bool]]]:
            return (look(self.store), {c: changed_since(self.store / c, records) for c, records in failed.items()},
                    {c: served_replaced(m.version_dir, m.manifest, known_keys.get(c)) for c, m in watched.items()})
        try:
            seen, changed, served_now = await asyncio.to_thread(scan)
        except OSError:
            self.removals.unknown()
            raise
        replaced = {c: key for c, (key, yes) in served_now.items() if yes and key is not None}
        for category, (key, yes) in served_now.items():
            if key is not None and not yes:
                self._manifests_seen[category] = (watched[category].loaded_at, key)
        self._forget_failed_versions_gone(seen)
        self._note_unreadable(seen)
        pins = set(self._pins) | set(self.settings.pinned_versions)
        # A model loaded pinned whose pin ended since (:meth:`end_pin`) is watched as unpinned.
        gone = self.removals.check(seen, self.categories, {c: Served(m.version, self.pinned(c, m))
                                                           for c, m in self._models.items()}, pins)
        for category in gone.categories:
            async with self._lock(category):
                self._retire(category)
        loaded = []
        # Every new category is ``loading`` from now (they load one after the other).
        arriving = [c for c in seen.serveable() if c not in self.categories]
        self._arriving.update(arriving)
        try:
            await self._follow(seen, gone, changed, watched, replaced, loaded)
        finally:
            self._arriving.difference_update(arriving)
        return loaded

    async def _follow(self, seen: StoreLook, gone: Gone, changed: dict[str, dict[str, FailedVersion]],
                      watched: dict[str, LoadedModel], replaced: dict[str, ManifestKey], loaded: list[str]) -> None:
        """:meth:`refresh`'s loads, category after category: new ones, newer versions, a served
        version replaced or gone; each loaded is appended to ``loaded``."""
        for category in seen.serveable():
            new = category not in self._categories and category not in self._models
            fall_back = category in gone.versions
            listed = seen.versions(category)  # this scan's listing: the store is not read again
            looked = changed.get(category, {})

            def renewed() -> bool:  # the model the scan found replaced still serves
                return category in replaced and self._models.get(category) is watched[category]
            if not self._candidates(category, initial=new, served_gone=fall_back, versions=listed, changed=looked,
                                    served_replaced=renewed()):
                self._arriving.discard(category)
                continue
            async with self._lock(category):
                # Again: an operator's reload ?version= this waited for may have pinned it since.
                renewing = renewed()
                model, _ = await self._load_newest(category, self._candidates(
                    category, initial=new, served_gone=fall_back, versions=listed, changed=looked,
                    served_replaced=renewing))
                if model is not None:
                    loaded.append(category)
                    if renewing and model.version == watched[category].version:
                        # Not read again until it changes: an engine process still holding the
                        # folder's old engine (multi-process) must not bring a load at every scan.
                        self._manifests_seen[category] = (model.loaded_at, replaced[category])
            self._arriving.discard(category)

    def _forget_failed_versions_gone(self, seen: StoreLook) -> None:
        """Failed versions no longer in the store are forgotten: every scan reads the folder of
        each one recorded, and nothing showed them (only the versions listed are). A category
        this scan could not list, or whose folder is gone (its retirement forgets it), keeps its
        records."""
        for category, records in self._failed_versions.items():
            listed = seen.categories.get(category)
            gone = [v for v in records if v not in listed] if listed is not None else []
            for version in gone:
                del records[version]
            if gone:
                self._failed_versions_changed(category)

    def _note_unreadable(self, seen: StoreLook) -> None:
        """Keep what this scan found of version folders that cannot be read: each is a failed
        version (``GET /v1/models``, msflow_model_versions_failed) until readable or gone, and
        is said once per reason (each scan said it again, and nothing else showed it). A
        category this scan could not list keeps what was found before."""
        for category in set(self._unreadable) | set(seen.unreadable):
            if seen.categories.get(category, []) is None:
                continue
            before, now = self._unreadable.get(category, {}), seen.unreadable.get(category, {})
            if before == now:
                continue
            for version, why in now.items():
                if before.get(version) != why:
                    log.warning("%s: version %s cannot be read, not served until it can: %s", category, version, why)
            for version in before.keys() - now.keys():
                log.info("%s: version %s is no longer unreadable (readable again, or gone)", category, version)
            if now:
                self._unreadable[category] = dict(now)
            else:
                self._unreadable.pop(category, None)
            self._failed_versions_changed(category)

    def _failed_versions_changed(self, category: str) -> None:
        if self.on_failed_versions_changed is not None and category in self.categories:
            self.on_failed_versions_changed(category)

    def _candidates(self, category: str, initial: bool = False, unpinning: bool = False,
                    served_gone: bool = False, versions: list[str] | None = None,
                    changed: dict[str, FailedVersion] | None = None, served_replaced: bool = False) -> list[str]:
        """The versions of ``category`` to try, in order (newest first), until one loads.
        A settings pin: that version alone (at start-up, or a category new to the watch).
        Else :func:`~service.pipeline.store_watch.watch_candidates` of ``versions`` (the store's
        complete versions, listed now when not given; ``served_gone``: the served version left
        the store for the grace period; ``served_replaced``: its folder holds another version
        now); nothing while an operator's reload ?version= pins it, served or not
        (``unpinning``: the operator's reload that ends the pin)."""
        pinned = self.settings.pinned_versions.get(category)
        if pinned is not None:
            return [pinned] if initial else []
        if category in self._pins and not unpinning:
            return []
        current = self._models.get(category)
        listed = self._versions(category) if versions is None else versions
        records = self._failed_versions.get(category, {})
        # ``changed``: what the watch's scan found of the failed versions' folders (in its thread).
        failed = still_failed(self.store / category, records) if changed is None else failed_now(records, changed)
        return watch_candidates(listed, current.version if current else None, failed, served_gone, served_replaced)

    def _retire(self, category: str) -> None:
        """``category`` left the store for the grace period (under its lock): whatever serves it
        stops (requests already on it finish: the runtime drains it as at a swap), and it is
        unknown here, saying since when, until its folder comes back (a new category then)."""
        model = self._models.pop(category, None)
        for about in (self._failed, self._failed_versions, self._unreadable, self._unhealthy, self._pins,
                      self._manifests_seen):
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


__all__ = ["EVALUATION_ASSETS", "ModelRegistry"]
