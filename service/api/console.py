"""The operator console (``GET /``, static files in ``service/static/``) and the routes it
needs beyond inspection:

* ``GET /v1/models/{category}/assets/{name}``: the evaluation files export copied into the
  serving version (``roc.png``, ``examples.png``, ``report.json``; nothing else, by name).
* ``GET /v1/models/{category}/threshold`` (API key): calibrated and effective threshold.
* ``PUT /v1/models/{category}/threshold`` (admin), body ``{"threshold": RAW, "ng_threshold": RAW}``
  (either or both; ``"ng_threshold": null`` ends an NG override): the serving version's ok and
  ng bounds, effective at once
  (:mod:`service.pipeline.thresholds`). With ``"version"`` (the console sends the one it
  showed) a change meant for another version than the one served is refused (409
  ``version_changed``): the store watch may swap in version n+1 between the operator reading
  version n's scores and the PUT, and n's raw threshold means nothing for n+1.
* ``DELETE /v1/models/{category}/threshold[?version=N]`` (admin): back to the calibrated threshold.
* ``GET /v1/models/{category}/recent?threshold=X&limit=N`` (admin): the last scored images
  and how they would be classified at ``X`` (:mod:`service.pipeline.recent`).

The console is plain HTML/JS/CSS with no build step and no third-party requests; it is
served without a key (it holds no data) under a strict Content-Security-Policy, and calls
the API with the key the operator types (kept in ``sessionStorage``, sent as ``X-API-Key``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse
from service.api.static_files import AllowListedFiles

from service.api.auth import Admin, Authed, KeyFirstRoute
from service.api.deps import CategoryDep, StateDep
from service.api.errors import ApiError
from service.api.openapi import BODY_TOO_LARGE, UNAUTHORIZED, errors, ok
from service.pipeline.loaded_model import LoadedModel
from service.pipeline.registry import EVALUATION_ASSETS
from service.schemas import FrontEndsAnswered, RecentScores, ThresholdState, ThresholdUpdate

log = logging.getLogger(__name__)

# Shipped as package data: pyproject's [tool.setuptools.package-data] must list "static/*".
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Everything from this origin, nothing inline, no framing: the console never talks to a third party.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
# No framing and no sniffing: on every answer (service/api/security_headers.py).
_PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
                 "Referrer-Policy": "no-referrer"}
# What /static serves: the page's scripts and style, not the page (served at / with its policy).
STATIC_SUFFIXES = (".js", ".css")
_NOT_LOADED = "`model_not_loaded` (still loading, or failed to load; Retry-After)"
_READ_ERRORS = errors({401: UNAUTHORIZED, 404: "`unknown_category`", 503: _NOT_LOADED})
_ADMIN = ("`cross_site_refused`, `admin_disabled`, `forbidden` (a valid key that is not an admin key), "
          "`host_refused` (opened by MSFLOW_DEV_OPEN_ADMIN: a Host that is not loopback)")
_VERSION_CHANGED = "`version_changed` (`version` is not the version served; nothing changed)"
_THRESHOLD_WRITE = ("`redis_unavailable` (Redis configured but down: nothing changed; Retry-After), " + _NOT_LOADED)

router = APIRouter(route_class=KeyFirstRoute)  # the key before the body (PUT threshold)


@router.get("/", include_in_schema=False)
async def console_page() -> FileResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():  # a wheel built without the package data: the API works, the console does not
        raise ApiError(404, "console_not_installed", f"the console's files are not installed ({STATIC_DIR}); "
                       "the API under /v1 works")
    return FileResponse(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get("/v1/models/{category}/assets/{name}", dependencies=[Authed], response_class=FileResponse,
            responses={**ok("The file", content={"image/png": {"schema": {"type": "string", "format": "binary"}},
                                                 "application/json": {"schema": {"type": "object"}}},
                            headers={"X-Model-Version": {"description": "the version the file belongs to",
                                                         "schema": {"type": "string"}}}),
                       **errors({401: UNAUTHORIZED, 404: "`unknown_category`, `asset_not_found`", 503: _NOT_LOADED})})
async def get_asset(category: CategoryDep, name: str, state: StateDep) -> FileResponse:
    """An evaluation file of the serving version: ``roc.png``, ``examples.png`` or ``report.json``."""
    media_type = EVALUATION_ASSETS.get(name)
    model = state.registry.get(category)
    if media_type is None:
        raise ApiError(404, "asset_not_found", f"no asset {name!r}; assets are {', '.join(EVALUATION_ASSETS)}",
                       details={"allowed": list(EVALUATION_ASSETS)})
    path = model.version_dir / name
    if not path.is_file():
        raise ApiError(404, "asset_not_found", f"{category} version {model.version} has no {name} (run `msflow "
                       "eval` before `msflow export` to include the evaluation)")
    return FileResponse(path, media_type=media_type, headers={
        "Cache-Control": "private, max-age=60", "X-Content-Type-Options": "nosniff",
        "X-Model-Version": model.version})


def _threshold_state(state: StateDep, category: str, persisted: list[str] | None = None) -> ThresholdState:
    man = state.registry.get(category).manifest
    override = state.thresholds.for_manifest(man)
    effective = state.thresholds.calibration(man)
    return ThresholdState(category=category, version=man.version, calibrated_threshold=man.calibration.threshold,
                          threshold=effective.threshold, calibrated_ng_threshold=man.calibration.ng_bound,
                          ng_threshold=effective.ng_bound, override=override, persisted=persisted or [])


@router.get("/v1/models/{category}/threshold", response_model=ThresholdState, dependencies=[Authed],
            responses={**ok(), **_READ_ERRORS})
async def get_threshold(category: CategoryDep, state: StateDep) -> ThresholdState:
    return _threshold_state(state, category)


def _version_changed(category: str, wanted: str, serving: str, written: bool = False) -> ApiError:
    message = (f"{category} serves version {serving}, not version {wanted}" + (
        f": it was swapped in while the change was written, which applies to version {wanted} only"
        if written else ": nothing changed") + "; look at the version served and choose its threshold again")
    return ApiError(409, "version_changed", message, details={"requested": wanted, "serving": serving})


def _still_serving(state: StateDep, category: str, model: LoadedModel, wanted: str | None) -> Callable[[], None]:
    """The change's guard, run under the overrides' lock: ``model`` (and ``wanted``, when the
    client named a version) is still the version served. A reload or the store watch may
    swap a version in while the change waits for the lock."""
    def guard() -> None:
        serving = state.registry.get(category).version
        if serving != model.version or (wanted is not None and wanted != serving):
            raise _version_changed(category, wanted or model.version, serving)
    return guard


def _check_after(state: StateDep, category: str, model: LoadedModel) -> None:
    """A swap during the writes themselves (after the guard): the change landed on a version no
    longer served. Said, rather than answered as if it applied to the version served now."""
    serving = state.registry.get(category).version
    if serving != model.version:
        raise _version_changed(category, model.version, serving, written=True)


@router.put("/v1/models/{category}/threshold", response_model=ThresholdState, dependencies=[Admin], responses={
    **ok(), **errors({401: UNAUTHORIZED, 403: _ADMIN, 404: "`unknown_category`", 409: _VERSION_CHANGED,
                      413: BODY_TOO_LARGE,
                      422: "`invalid_request` (the body), `threshold_out_of_range` (without `force`), "
                           "`invalid_bounds` (ng_threshold below threshold)",
                      500: "`threshold_not_persisted` (nothing changed), `internal_error`", 503: _THRESHOLD_WRITE})})
async def put_threshold(category: CategoryDep, body: ThresholdUpdate, state: StateDep) -> ThresholdState:
    """Override the serving version's image threshold with a RAW score (the unit of ``raw_score``).

    Applies to every image scored from now on, survives restarts (``threshold_override.json``
    beside the manifest, and Redis when configured so every replica agrees); a new model
    version starts at its own calibrated threshold. 503 when Redis is configured but down;
    422 ``threshold_out_of_range`` far outside the calibration's scores unless ``force``;
    409 ``version_changed`` when ``version`` is not the version served."""
    model = state.registry.get(category)
    guard = _still_serving(state, category, model, body.version)
    guard()  # the common case, answered before any lock or write
    # What the body leaves out stays: the effective ok bound, an ng override already set
    # (``"ng_threshold": null`` ends it: the manifest's bound, never below the ok bound).
    current = state.thresholds.for_manifest(model.manifest)
    threshold = body.threshold if body.threshold is not None else state.thresholds.threshold(model.manifest)
    ng = body.ng_threshold if body.ng_threshold is not None or body.ends_ng_override \
        else (current.ng_threshold if current else None)
    _, persisted = await state.thresholds.set(category, model.version, threshold,
                                              calibration=model.manifest.calibration, force=body.force,
                                              seen=(await state.recent.gather(category)).raw_scores(model.version),
                                              ng_threshold=ng,
                                              guard=guard)
    _check_after(state, category, model)
    return _threshold_state(state, category, persisted)


@router.delete("/v1/models/{category}/threshold", response_model=ThresholdState, dependencies=[Admin], responses={
    **ok(), **errors({401: UNAUTHORIZED, 403: _ADMIN, 404: "`unknown_category`", 409: _VERSION_CHANGED,
                      500: "`threshold_not_persisted` (nothing changed), `internal_error`", 503: _THRESHOLD_WRITE})})
async def delete_threshold(category: CategoryDep, state: StateDep, version: str | None = None) -> ThresholdState:
    """Back to the calibrated threshold of the serving version (``version``: as for PUT)."""
    model = state.registry.get(category)
    guard = _still_serving(state, category, model, version)
    guard()
    persisted = await state.thresholds.clear(category, model.version, guard=guard)
    _check_after(state, category, model)
    return _threshold_state(state, category, persisted)


@router.get("/v1/models/{category}/recent", response_model=RecentScores, dependencies=[Admin], responses={
    **ok(), **errors({401: UNAUTHORIZED,
                      403: "`admin_disabled`, `forbidden` (a valid key that is not an admin key), `host_refused`",
                      404: "`unknown_category`", 422: "`invalid_request` (`threshold`, `limit`)", 503: _NOT_LOADED})})
async def recent_scores(category: CategoryDep, state: StateDep,
                        threshold: Annotated[float | None, Query(allow_inf_nan=False)] = None,
                        limit: Annotated[int, Query(ge=1, le=100_000)] = 100) -> RecentScores:
    """The last images scored by this replica (every front end of a multi-process one, and
    ``partial`` where one did not answer; newest first) and, with ``threshold``, how the recent
    images of the serving version would be classified at that raw threshold."""
    recent = await state.recent.gather(category)
    current = _threshold_state(state, category)
    return RecentScores(
        category=category, version=current.version, calibrated_threshold=current.calibrated_threshold,
        threshold=current.threshold, capacity=state.recent.capacity, scores=recent.scores(limit, threshold),
        summary=None if threshold is None else recent.summary(current.version, threshold, current.threshold),
        partial=recent.partial, front_ends=None if recent.front_ends is None else FrontEndsAnswered(
            answered=recent.front_ends[0], of=recent.front_ends[1]))


def install_console(app: FastAPI) -> None:
    """Add the console page, its static files (``/static``) and its API routes to ``app``."""
    app.include_router(router)
    if STATIC_DIR.is_dir():
        app.mount("/static", AllowListedFiles(directory=STATIC_DIR, names=[
            p.name for p in STATIC_DIR.iterdir() if p.suffix in STATIC_SUFFIXES]), name="static")
    else:  # never fail start-up over the console: the API is what production lines use
        log.warning("console files missing at %s (package data not installed): GET / answers 404", STATIC_DIR)
