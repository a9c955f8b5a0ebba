"""API keys (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``) and the cross-site guard.

No keys configured: the inspection API is open (the server binds loopback unless told
otherwise). ``MSFLOW_API_KEYS`` guard every ``/v1`` route; ``MSFLOW_ADMIN_API_KEYS`` are
also valid there and are the only keys that may reload models or move thresholds.
Admin routes fail closed: without an admin key configured they answer 403, unless the
development switch ``MSFLOW_DEV_OPEN_ADMIN`` is set on a loopback-bound server with no
keys at all. ``MSFLOW_REVIEWER_API_KEYS`` (named) may use the API and the review queue, and
label items; each label records the key's name. Keys are compared in constant time against
every configured key.

State-changing routes also refuse what a browser sends on behalf of another site
(:func:`refuse_cross_site`): the key header already does that when keys are configured
(a cross-site form cannot set headers, and no CORS is allowed), the guard covers open
development servers too. Where a route's keys are configured, a request without a key is
answered 401 before the guard looks at it (every route checks the key first): it could
never pass, whichever site sent it, and the guard's 403 would send its client looking for
the wrong fault. Routes with a JSON body check it before the body is even read
(:class:`KeyFirstRoute`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.responses import Response

from service.api.errors import ApiError
from service.api.deps import StateDep, get_state
from service.config import Settings


# What a key is stripped of: HTTP's own blanks. str.strip() also took U+00A0 and U+0085 (bytes
# 0xA0 and 0x85 a header may carry) and so turned "X-API-Key: \xa0" into the empty key.
_BLANKS = " \t"


def _presented_key(request: Request) -> str | None:
    """The key sent, or None for none (an empty one is none: it never matches)."""
    key = request.headers.get("x-api-key", "").strip(_BLANKS)
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(_BLANKS) or None
    return None


def client_scope(request: Request, settings: Settings) -> str:
    """Whose request this is, for what one client's names must not reach another's (its job
    Idempotency-Keys, its jobs): a digest of the key presented, never the key; empty on an open
    API (no MSFLOW_API_KEYS), which has no clients to tell apart. There the key presented was
    the client too: a gateway's Authorization token for another service, renewed every few
    minutes, made a job's poll 404 and its Idempotency-Key queue it again under the next."""
    key = _presented_key(request) if settings.api_keys else None
    return "" if key is None else hashlib.sha256(key.encode()).hexdigest()


def _key_in(key: str, keys: list[str]) -> bool:
    # Constant-time comparison against every key, so timing reveals neither key nor position.
    # An empty configured key (a JSON list from a template whose variable was unset) matches
    # nothing: it would have let in anyone who sends a key of blanks.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode()) and bool(candidate)
    return found


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, state: StateDep) -> None:
    """401 unless the API is open (no keys configured) or a valid key is presented."""
    s = state.settings
    if not s.api_keys:
        return
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "send an API key in X-API-Key or Authorization: Bearer")
    if not _key_in(key, s.api_keys + s.admin_api_keys + list(s.reviewer_api_keys.values())):
        raise _unauthorized("invalid_api_key", "the API key is not valid")


_FORM_SAFE_TYPES = ("application/json",)  # what an HTML form can never send
_CLIENT_HEADER = "x-requested-with"  # any value: a custom header forces a CORS preflight


async def refuse_cross_site(request: Request) -> None:
    """403 for a state-changing request a browser makes on behalf of another site.

    Refused: ``Sec-Fetch-Site`` ``cross-site``/``same-site`` (every current browser sends it)
    and ``Origin: null``; curl and SDKs send neither. Admin routes also need a key header,
    a JSON body or ``X-Requested-With`` (:func:`_refuse_formless`), which covers browsers
    too old to send ``Sec-Fetch-Site``."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    headers = request.headers
    if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
        raise ApiError(403, "cross_site_refused", "state-changing requests from another site are refused")
    # Origin is not compared with Host: a reverse proxy may rewrite Host, and would lock
    # the console out. An opaque origin (sandboxed frame, file://) is never the console.
    if headers.get("origin") == "null":
        raise ApiError(403, "cross_site_refused", "requests from an opaque origin are refused")


def _refuse_formless(request: Request) -> None:
    """Admin routes: a key, a JSON body or a custom header, which no cross-site form can send."""
    if _presented_key(request) is not None or request.headers.get(_CLIENT_HEADER):
        return
    if request.headers.get("content-type", "").split(";")[0].strip().lower() in _FORM_SAFE_TYPES:
        return
    raise ApiError(403, "cross_site_refused", "send the API key, a JSON body or an X-Requested-With header "
                   "(a cross-site form can send none of them)")


def _loopback_name(host: str) -> bool:
    """``host`` (a Host header: name or address, maybe a port) names this machine's loopback."""
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # browsers resolve these to loopback themselves
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _refuse_rebound(request: Request) -> None:
    """Routes the development switch opens answer loopback names only. A site whose name its
    DNS turns to 127.0.0.1 (DNS rebinding) is, to the browser, its own origin: same-origin, any
    header, a JSON body; only the Host header still says it is not this machine."""
    host = request.headers.get("host")
    if host is not None and not _loopback_name(host):
        raise ApiError(403, "host_refused", "routes opened by MSFLOW_DEV_OPEN_ADMIN answer loopback names only "
                       "(localhost, 127.0.0.1, [::1]): configure keys to reach them by another name")


def access_summary(s: Settings) -> str:
    """Who may use what, for the start-up log line: the inspection routes are open without
    inspection keys even where admin or reviewer keys are set, which "open API, no keys
    configured" hid on a server holding admin keys, and "API keys required" overstated."""
    dev_open = s.dev_open_admin and not s.api_keys
    inspection = "keyed" if s.api_keys else "open (no MSFLOW_API_KEYS)"
    admin = "keyed" if s.admin_api_keys else "open on loopback (dev)" if dev_open else "closed"
    review = ("keyed" if s.reviewer_api_keys or s.admin_api_keys
              else "open on loopback (dev)" if dev_open else "closed")
    return f"inspection {inspection}, admin {admin}, review {review}"


async def require_admin_key(request: Request, state: StateDep) -> None:
    """Admin routes need an admin key; with none configured they are closed, except on a
    loopback development server with ``dev_open_admin`` and no keys at all."""
    s = state.settings
    if s.admin_api_keys and _presented_key(request) is None:
        raise _unauthorized("missing_api_key", "this route needs an admin API key")
    await refuse_cross_site(request)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        _refuse_formless(request)
    if not s.admin_api_keys:
        if s.dev_open_admin and not s.api_keys:
            _refuse_rebound(request)
            return
        raise ApiError(403, "admin_disabled", "admin routes are closed: no admin key is configured (set "
                       "MSFLOW_ADMIN_API_KEYS; on a development machine MSFLOW_DEV_OPEN_ADMIN=true opens them)")
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "this route needs an admin API key")
    if not _key_in(key, s.admin_api_keys):
        # A valid key of another kind (inspection or reviewer) is known, just not allowed here: 403.
        if _key_in(key, s.api_keys + list(s.reviewer_api_keys.values())):
            raise ApiError(403, "forbidden", "this route needs an admin API key")
        raise _unauthorized("invalid_api_key", "the API key is not valid")


async def require_reviewer_key(request: Request, state: StateDep) -> str:
    """The review queue and labelling: a reviewer key or an admin key; returns the name recorded
    with a label (the reviewer key's name, ``admin-<sha256 of the key, 8 hex>`` for an admin
    key: never the key itself). Closed like the admin routes when neither kind is configured."""
    s = state.settings
    if (s.reviewer_api_keys or s.admin_api_keys) and _presented_key(request) is None:
        raise _unauthorized("missing_api_key", "this route needs a reviewer or admin API key")
    await refuse_cross_site(request)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        _refuse_formless(request)
    if not s.reviewer_api_keys and not s.admin_api_keys:
        if s.dev_open_admin and not s.api_keys:
            _refuse_rebound(request)
            return "dev-open"
        raise ApiError(403, "review_disabled", "the review queue is closed: no reviewer or admin key is configured "
                       "(set MSFLOW_REVIEWER_API_KEYS=name=key,...; on a development machine MSFLOW_DEV_OPEN_ADMIN)")
    key = _presented_key(request)
    if key is None:
        raise _unauthorized("missing_api_key", "this route needs a reviewer or admin API key")
    name = None
    for candidate_name, candidate in s.reviewer_api_keys.items():  # every key compared: constant time
        if _key_in(key, [candidate]):
            name = candidate_name
    if name is not None:
        return name
    if _key_in(key, s.admin_api_keys):
        return "admin-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    if _key_in(key, s.api_keys):
        raise ApiError(403, "forbidden", "this route needs a reviewer or admin API key")
    raise _unauthorized("invalid_api_key", "the API key is not valid")


Authed = Depends(require_api_key)
Admin = Depends(require_admin_key)
NotCrossSite = Depends(refuse_cross_site)
Reviewer = Annotated[str, Depends(require_reviewer_key)]


# ---------------------------------------------------------------------- the key before the body
_KEY_CHECKS = (require_api_key, require_admin_key, require_reviewer_key)


def _key_checks(dependant: Dependant) -> list[Callable[..., Any]]:
    """The key checks among a route's dependencies (its router's and its parameters'), in the
    order FastAPI would run them, each once."""
    found: list[Callable[..., Any]] = []
    for sub in dependant.dependencies:
        if sub.call in _KEY_CHECKS and sub.call not in found:
            found.append(sub.call)
        found.extend(c for c in _key_checks(sub) if c not in found)
    return found


class KeyFirstRoute(APIRoute):
    """A route whose key checks run before FastAPI reads its body.

    FastAPI reads and parses a route's JSON body before it resolves any dependency: a request
    without a key and with malformed JSON (or bytes that are not UTF-8) to the threshold or the
    label route was answered 422 ``invalid_request`` describing its body, where admin and
    review routes fail closed (401 before anything about the payload). Such a route runs its
    key checks first here, then FastAPI's own handler, which runs them again as dependencies
    (microseconds, on routes an operator calls by hand): the route, its dependencies and so
    the OpenAPI document stay what they declare. Routes without a body are FastAPI's as
    they are (the inspection route reads its body itself, after its key check)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = _key_checks(self.dependant)
        if self.body_field is None or not checks:
            return handler

        async def key_first(request: Request) -> Response:
            state = await get_state(request)
            for check in checks:
                await check(request, state)
            return await handler(request)

        return key_first
