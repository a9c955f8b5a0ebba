"""What routes depend on: the shared :class:`~service.pipeline.state.ServiceState` and a
known category (404 listing the known ones otherwise).

Every dependency here and in :mod:`service.api.auth` is ``async def`` although none awaits:
FastAPI runs a plain ``def`` dependency in a worker thread, and that hop per dependency per
request was a third of the event loop's time in the front-end benchmark."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from models.manifest import CATEGORY_PATTERN
from service.api.errors import unknown_category_error as unknown_category
from service.pipeline.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def known_category(category: str, state: StateDep) -> str:
    """404 listing what exists for an unknown or malformed category (no path tricks reach the store)."""
    if CATEGORY_PATTERN.match(category) and category in state.registry.categories:
        return category
    raise unknown_category(category, state.registry.categories)


CategoryDep = Annotated[str, Depends(known_category)]
