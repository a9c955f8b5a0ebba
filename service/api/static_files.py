"""Static files from a folder, only those named: a folder shipped by a package (Swagger UI's
bundle) or beside the code holds more than the pages need, and whatever it holds would be
served from this origin."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Scope


class AllowListedFiles(StaticFiles):
    def __init__(self, *, directory: str | Any, names: Iterable[str]) -> None:
        super().__init__(directory=directory)
        self.names = frozenset(names)

    async def get_response(self, path: str, scope: Scope) -> Any:
        if path not in self.names:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)
