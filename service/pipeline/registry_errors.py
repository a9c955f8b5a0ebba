"""What the model registry answers when a category cannot be served: the errors the API maps
to statuses (:mod:`service.api.errors`, the models routes) and the worker to job failures."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """The store or a category cannot be served (missing, empty, inconsistent)."""


class VersionNotFound(RegistryError):
    """The requested or pinned version is not in the store."""


class PinnedVersionRemoved(RegistryError):
    """The version a pin in force holds a category to left the store, and nothing that could
    serve it without its folder holds it any more."""


class UnknownCategory(KeyError):
    """No such category in the model store. ``removed``: why, when the store watch retired it
    (its folder left the store), for the answer to say."""

    def __init__(self, category: str, known: list[str], removed: str | None = None) -> None:
        super().__init__(category)
        self.category = category
        self.known = known
        self.removed = removed

    def __str__(self) -> str:  # KeyError's is the bare repr of the name
        return f"unknown category {self.category!r}" + (f": {self.removed}" if self.removed else "")


class ModelNotLoaded(RuntimeError):
    """The category exists but has no warm engine (still loading, or its load failed)."""


__all__ = ["ModelNotLoaded", "PinnedVersionRemoved", "RegistryError", "UnknownCategory", "VersionNotFound"]
