"""API keys: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``.

No keys configured: the API is open. ``MSFLOW_API_KEYS`` guard every ``/v1`` route;
``MSFLOW_ADMIN_API_KEYS`` are also valid there and are the only keys that may reload
models. Keys are compared in constant time against every configured key.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from service.api.errors import ApiError
from service.api.deps import StateDep


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def _key_in(key: str, keys: list[str]) -> bool:
    # Constant-time comparison against every key, so timing reveals neither key nor position.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, state: StateDep) -> None:
    """401 unless the API is open (no keys configured) or a valid key is presented."""
    s = state.settings
    if not s.api_keys:
        return
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "send an API key in X-API-Key or Authorization: Bearer")
    if not _key_in(key, s.api_keys + s.admin_api_keys):
        raise _unauthorized("invalid_api_key", "the API key is not valid")


def require_admin_key(request: Request, state: StateDep) -> None:
    """Admin routes need an admin key; with no keys configured at all the service is open."""
    s = state.settings
    if not s.admin_api_keys:
        if not s.api_keys:
            return
        raise ApiError(403, "admin_disabled", "no admin keys are configured (MSFLOW_ADMIN_API_KEYS)")
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "this route needs an admin API key")
    if not _key_in(key, s.admin_api_keys):
        if _key_in(key, s.api_keys):
            raise ApiError(403, "forbidden", "this route needs an admin API key")
        raise _unauthorized("invalid_api_key", "the API key is not valid")


Authed = Depends(require_api_key)
Admin = Depends(require_admin_key)
