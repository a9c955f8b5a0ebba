"""What routes depend on: the shared :class:`~service.pipeline.state.ServiceState` and a
known category (404 listing the known ones otherwise).

Every dependency here and in :mod:`service.api.auth` is ``async def`` although none awaits:
FastAPI runs a plain ``def`` dependency in a worker thread, and that hop per dependency per
request was a third of the event loop's time in the front-end benchmark."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.manifest import CATEGORY_PATTERN
from service.api.errors import ApiError, unknown_category_error as unknown_category
from service.pipeline.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def known_category(category: str, state: StateDep) -> str:
    """404 listing what exists for an unknown or malformed category (no path tricks reach the
    store), saying when one the store watch retired left the store."""
    if CATEGORY_PATTERN.fullmatch(category) and category in state.registry.categories:
        return category
    raise unknown_category(category, state.registry.categories, state.registry.removed_note(category))


CategoryDep = Annotated[str, Depends(known_category)]

BUILDING_RETRY_AFTER_S = 10  # a model build's steps take minutes: a client polling each second only adds load


async def category_to_inspect(category: str, state: StateDep) -> str:
    """:func:`known_category` for the routes that inspect: a category a builder writing into
    the store reports as under way (``<store>/.build/status.json``: training, exporting ...)
    is 503 ``model_building`` with Retry-After, not 404 ``unknown_category`` (a newcomer's
    first requests during the demo's build read "unknown category 'brick'; known: none" for
    three minutes while ``GET /v1/models`` said "brick: training")."""
    if CATEGORY_PATTERN.fullmatch(category) and category not in state.registry.categories:
        step = await _building(state, category)
        if step is not None:
            raise ApiError(503, "model_building", f"{category!r} is being built ({step}); it is served as soon "
                           "as it is exported (GET /v1/models: building)",
                           headers={"Retry-After": str(BUILDING_RETRY_AFTER_S)})
    return await known_category(category, state)


async def _building(state: ServiceState, category: str) -> str | None:
    """``stage: step`` of ``category``'s build while the build runs and that step is not final
    (the progress read off the event loop, one read shared by the requests asking together)."""
    progress = await state.registry.build_progress_off_loop()
    if progress is None or progress.state != "running" or category not in progress.categories:
        return None
    for stage, step in progress.categories[category].stages.items():
        if step.state not in ("served", "failed"):
            return f"{stage}: {step.state}"
    return None


InspectCategoryDep = Annotated[str, Depends(category_to_inspect)]
