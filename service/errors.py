"""The error every route raises for a deliberate answer; the app turns it into
``{"error": {"code", "message", "details"?}}`` (see :func:`service.app.error_response`)."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answer: HTTP status, stable machine-readable code, human message."""

    def __init__(self, status_code: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.code, self.message, self.details, self.headers = (
            status_code, code, message, details, headers)


__all__ = ["ApiError"]
