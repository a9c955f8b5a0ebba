"""Swapping a version in, safely: the part of the model registry that builds, warms and
swaps one version of a category (:class:`VersionSwaps`, under the category's lock); which
version, and when, is :class:`~service.pipeline.registry.ModelRegistry`'s to say.

A version is built with the registry's engine factory
(:func:`service.engines.factory.load_engine`, or the engine process's) and warmed with one
full batch (first calls allocate memory, pick kernels and build TensorRT contexts; a
customer request must not pay that), in a thread, *before* one dict entry is swapped, so
the swap is atomic: batches already running finish on the old engine, the next batch uses
the new one, and no request fails. A failed load leaves the old engine serving, and is
recorded where readiness, ``GET /v1/models`` and the store watch look; a pin in force that
cannot be followed holds all the same (:meth:`VersionSwaps._follow_failed`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from service.config import Settings
from service.pipeline.loaded_model import EngineFactory, LoadedModel, build_version
from service.pipeline.registry_errors import RegistryError, VersionNotFound
from service.pipeline.registry_view import RegistryView
from service.pipeline.store_watch import FailedVersion, folder_state

log = logging.getLogger("service.pipeline.registry")  # the registry's own log, as before the split


class VersionSwaps(RegistryView):
    """Build, warm and swap in one version of a category at a time; record what failed."""

    def __init__(self, settings: Settings, engine_factory: EngineFactory,
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
        the store is still tried (see ``ModelRegistry.reload``)."""
        versions = self._versions(category)
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


__all__ = ["VersionSwaps"]
