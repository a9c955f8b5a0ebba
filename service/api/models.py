"""``GET /v1/models``, ``GET /v1/models/{category}`` and the admin reload."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query

from models.manifest import CATEGORY_PATTERN, ManifestError
from service.api.auth import Admin, Authed, KeyFirstRoute
from service.api.deps import CategoryDep, StateDep, unknown_category
from service.api.errors import ApiError
from service.api.openapi import UNAUTHORIZED, errors, ok
from service.engines.base import EngineError
from service.pipeline.engine_errors import EngineUnavailable
from service.pipeline.registry_errors import RegistryError, UnknownCategory, VersionNotFound
from service.schemas import ModelInfo, ModelList

log = logging.getLogger(__name__)
router = APIRouter(route_class=KeyFirstRoute)


@router.get("/v1/models", response_model=ModelList, dependencies=[Authed],
            responses={**ok(), **errors({401: UNAUTHORIZED})})
async def list_models(state: StateDep) -> ModelList:
    # The store's files read in threads (service.pipeline.registry_view: describe_off_loop).
    return ModelList(models=await state.registry.describe_all_off_loop(), failed=state.registry.failed,
                     building=await state.registry.build_progress_off_loop())


@router.get("/v1/models/{category}", response_model=ModelInfo, dependencies=[Authed], responses={
    **ok(), **errors({401: UNAUTHORIZED, 404: "`unknown_category`",
                      503: "`model_not_loaded` (still loading, or failed to load; Retry-After)"})})
async def get_model(category: CategoryDep, state: StateDep) -> ModelInfo:
    return await state.registry.describe_off_loop(category)


@router.post("/v1/models/{category}/reload", response_model=ModelInfo, dependencies=[Admin], responses={
    **ok(), **errors({401: UNAUTHORIZED,
                      403: "`cross_site_refused`, `admin_disabled`, `forbidden` (a valid key that is not an admin "
                           "key), `host_refused`",
                      404: "`unknown_category`, `version_not_found`",
                      422: "`invalid_request` (`version` over 64 characters), `reload_failed` (the version cannot "
                           "be served; the previous one keeps serving)",
                      500: "`reload_failed` (an unexpected loader error; the previous version keeps serving), "
                           "`internal_error`",
                      503: "`engine_unavailable` (multi-process: the engine process is restarting; Retry-After)"})})
async def reload_model(category: str, state: StateDep,
                       version: Annotated[str | None, Query(max_length=64)] = None) -> ModelInfo:
    """Load the newest (or pinned, or given) version, warm it, then swap; on failure the
    previous version keeps serving."""
    if not CATEGORY_PATTERN.fullmatch(category):
        raise unknown_category(category, state.registry.categories)
    try:
        await state.reload(category, version)
    except (UnknownCategory, EngineUnavailable):  # the engine process restarting: 503 + Retry-After
        raise
    except VersionNotFound as exc:
        raise ApiError(404, "version_not_found", state.registry.public_message(exc)) from exc
    # Our own checks, their message the answer: the registry's, the manifest's, and an engine
    # that cannot load the version here (a graph onnxruntime refuses, a plan for another GPU,
    # a device this host lacks): the version is unusable, not the server broken.
    except (RegistryError, ManifestError, EngineError) as exc:
        log.error("reload of %s failed: %s", category, exc)
        raise ApiError(422, "reload_failed", f"reload of {category} failed; the previous version keeps "
                       f"serving: {state.registry.public_message(exc)}") from exc
    except Exception as exc:  # a loader's internal text stays in the log
        log.exception("reload of %s failed", category)
        raise ApiError(500, "reload_failed", f"reload of {category} failed ({type(exc).__name__}); the previous "
                       "version keeps serving; details in the server log") from exc
    return await state.registry.describe_off_loop(category)
