"""Locust load test of the MSFlow inspection API.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000          # web UI on :8089
    python -m loadtests.run --url http://127.0.0.1:8000 --duration 30s     # headless + report

Users post real images: by default the demo test set (``data/demo/*/test/*/*.png``).

Environment:
  MSFLOW_LOAD_IMAGES      a folder (MVTec layout ``<root>/<category>/test/<defect>/*.png``,
                          one category's ``test`` folder, or any folder of images) or a glob
  MSFLOW_LOAD_CATEGORIES  categories to hit, optionally weighted: ``grass:3,brick:1``
                          (default: every category ``GET /v1/models`` lists, equal weights;
                          falls back to the image folder names when that fails)
  MSFLOW_LOAD_API_KEY     sent as ``X-API-Key`` (and ``Authorization: Bearer``) when set
  MSFLOW_LOAD_MAX_IMAGES  images kept in memory per category (default 500)
  MSFLOW_LOAD_BATCH       images per request of the multi-image task (default 4; 0 disables it)
  MSFLOW_LOAD_JOB_TIMEOUT seconds a job may take before it counts as failed (default 30)

Tasks (weights): ``heatmap=none`` single image (8, the production fast path), a
multi-image request (2), ``heatmap=inline`` (2), and, only when ``GET /readyz`` reports
Redis as healthy, ``heatmap=url`` plus fetching the link (1) and an async job (1).
Every response is checked for status and JSON shape; a wrong one is a Locust failure.

Request names carry ``[xN]`` when one request holds N images, so the runner can turn
requests/s into images/s.
"""

from __future__ import annotations

import base64
import glob
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from locust import HttpUser, between, events, tag, task

log = logging.getLogger("msflow.loadtest")

DEFAULT_IMAGES = "data/demo/*/test/*/*.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REQUEST_TIMEOUT = float(os.environ.get("MSFLOW_LOAD_TIMEOUT", "60"))
ANY = "*"  # images not tied to a category


# ------------------------------------------------------------------ pure helpers (tested)
def _category_of(path: Path) -> str:
    """The category of an image in the MVTec layout ``<category>/test/<defect>/<file>``."""
    parts = path.parts
    if len(parts) >= 4 and parts[-3] == "test":
        return parts[-4]
    return ANY


def discover_images(spec: str | None = None, max_per_category: int = 500) -> dict[str, list[Path]]:
    """``{category: [paths]}`` from a folder or a glob.

    A folder in the MVTec layout (``<root>/<category>/test/<defect>/*``) contributes its test
    images, by category; any other folder contributes every image below it, and images that
    are not in a ``<category>/test/<defect>/`` folder belong to no category (they are posted
    to whichever category is picked)."""
    spec = spec or os.environ.get("MSFLOW_LOAD_IMAGES") or DEFAULT_IMAGES
    if os.path.isdir(spec):
        root = Path(spec)
        candidates = sorted(root.glob("*/test/*/*")) or sorted(root.rglob("*"))
    else:
        candidates = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    found: dict[str, list[Path]] = {}
    for path in candidates:
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(_category_of(path), []).append(path)
    rng = random.Random(0)
    for cat, paths in found.items():
        if len(paths) > max_per_category:
            found[cat] = sorted(rng.sample(paths, max_per_category))
    return found


def parse_weights(spec: str | None) -> dict[str, float]:
    """``"grass:3,brick"`` -> ``{"grass": 3.0, "brick": 1.0}``."""
    weights: dict[str, float] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight = item.partition(":")
        weights[name.strip()] = float(weight) if weight else 1.0
    return {k: v for k, v in weights.items() if v > 0}


def categories_from_models(payload: Any) -> list[str]:
    """Category names from a ``GET /v1/models`` body, whichever reasonable shape it has."""
    items: Any = payload
    if isinstance(payload, dict):
        for key in ("models", "categories", "items", "data"):
            if key in payload:
                items = payload[key]
                break
        else:
            items = [k for k, v in payload.items() if isinstance(v, (dict, list))]
    if isinstance(items, dict):
        items = [dict(v, category=k) if isinstance(v, dict) else k for k, v in items.items()]
    names: list[str] = []
    for item in items if isinstance(items, list) else []:
        name = item if isinstance(item, str) else (
            item.get("category") or item.get("name") if isinstance(item, dict) else None)
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return names


def redis_healthy(payload: Any) -> bool:
    """Whether a ``GET /readyz`` body says Redis is usable (``"redis": "ok"`` or similar,
    at the top level or one level down, e.g. under ``checks``)."""
    def ok(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return value.lower() in ("ok", "up", "ready", "healthy", "connected", "true")
        if isinstance(value, dict):
            return any(ok(value[k]) for k in ("status", "ok", "state", "healthy") if k in value)
        return False

    if not isinstance(payload, dict):
        return False
    if "redis" in payload:
        return ok(payload["redis"])
    return any(isinstance(v, dict) and "redis" in v and ok(v["redis"]) for v in payload.values())


def check_inspect(body: Any, category: str, n_images: int, heatmap: str) -> str | None:
    """None when a ``POST /v1/inspect`` JSON body matches the v1 contract, else the reason.
    ``heatmap`` is the requested mode (none, inline, url); any other value skips that check."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    for key in ("request_id", "category", "model_version", "engine", "results"):
        if key not in body:
            return f"missing {key!r}"
    if body["category"] != category:
        return f"category {body['category']!r} != {category!r}"
    results = body["results"]
    if not isinstance(results, list) or len(results) != n_images:
        return f"expected {n_images} results, got {len(results) if isinstance(results, list) else type(results).__name__}"
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            return f"results[{i}] is not an object"
        for key in ("index", "score", "raw_score", "threshold", "is_anomalous", "timings_ms"):
            if key not in r:
                return f"results[{i}] missing {key!r}"
        if r["index"] != i:
            return f"results[{i}].index is {r['index']!r}"
        score = r["score"]
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            return f"results[{i}].score {score!r} outside [0, 1]"
        if not isinstance(r["is_anomalous"], bool):
            return f"results[{i}].is_anomalous is not a boolean"
        hm = r.get("heatmap")
        if heatmap == "none" and hm:
            return f"results[{i}] has a heatmap although heatmap=none"
        if heatmap == "inline":
            # {"format": "png", "encoding": "base64", "data": ...} (or a bare base64 / data: string)
            data = hm.get("data") if isinstance(hm, dict) else hm
            if not isinstance(data, str) or not data:
                return f"results[{i}] has no inline heatmap"
            data = data.split(",", 1)[1] if data.startswith("data:") else data
            try:
                if not base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4)).startswith(PNG_SIGNATURE):
                    return f"results[{i}].heatmap is not a base64 PNG"
            except ValueError:
                return f"results[{i}].heatmap is not base64"
        if heatmap == "url" and heatmap_link(hm) is None:
            return f"results[{i}].heatmap is not a link: {hm!r}"
    return None


def heatmap_link(heatmap: Any) -> str | None:
    """The link of a ``heatmap=url`` result: a URL string or an object with ``url``/``href``."""
    if isinstance(heatmap, dict):
        heatmap = heatmap.get("url") or heatmap.get("href")
    return heatmap if isinstance(heatmap, str) and "/" in heatmap else None


# ------------------------------------------------------------------ shared state
class _Shared:
    """Discovered once per Locust process, before the first user runs."""

    lock = threading.Lock()
    ready = False
    images: dict[str, list[bytes]] = {}
    categories: list[str] = []
    weights: list[float] = []
    redis: bool = False


def _headers() -> dict[str, str]:
    key = os.environ.get("MSFLOW_LOAD_API_KEY")
    return {"X-API-Key": key, "Authorization": f"Bearer {key}"} if key else {}


def _get_json(url: str) -> Any:
    req = urllib.request.Request(url, headers=dict(_headers(), Accept="application/json"))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:  # /readyz answers 503 with a JSON body when degraded
        try:
            return json.loads(e.read() or b"null")
        except ValueError:
            return None
    except (OSError, ValueError) as e:
        log.warning("GET %s failed: %s", url, e)
        return None


def _prepare(host: str) -> None:
    with _Shared.lock:
        if _Shared.ready:
            return
        host = host.rstrip("/")
        max_images = int(os.environ.get("MSFLOW_LOAD_MAX_IMAGES", "500"))
        paths = discover_images(max_per_category=max_images)
        if not paths:
            raise RuntimeError(f"no images found for {os.environ.get('MSFLOW_LOAD_IMAGES') or DEFAULT_IMAGES!r}; "
                               "set MSFLOW_LOAD_IMAGES to a folder of images")
        served = categories_from_models(_get_json(f"{host}/v1/models"))
        weights = parse_weights(os.environ.get("MSFLOW_LOAD_CATEGORIES"))
        if not weights:
            names = served or [c for c in paths if c != ANY]
            weights = {c: 1.0 for c in names}
        if served:
            unknown = sorted(set(weights) - set(served))
            if unknown:
                log.warning("categories %s are not served (served: %s): requests will 404", unknown, served)
        if not weights:
            raise RuntimeError("no categories: GET /v1/models listed none and the images are not in "
                               "<category>/test/... folders; set MSFLOW_LOAD_CATEGORIES")
        # Each category posts its own images; one without any posts the uncategorised ones,
        # or else all of them. Only the images some category posts are read.
        pooled = [p for ps in paths.values() for p in ps]
        chosen = {c: paths.get(c) or paths.get(ANY) or pooled for c in weights}
        cache: dict[Path, bytes] = {}
        _Shared.images = {c: [cache[p] if p in cache else cache.setdefault(p, p.read_bytes()) for p in ps]
                          for c, ps in chosen.items()}
        _Shared.categories = list(weights)
        _Shared.weights = list(weights.values())
        _Shared.redis = redis_healthy(_get_json(f"{host}/readyz"))
        _Shared.ready = True
        log.info("load test: categories %s, %d images, redis tasks %s", dict(weights), len(cache),
                 "on" if _Shared.redis else "off")


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    if environment.host and not getattr(environment.runner, "is_master", False):
        try:
            _prepare(environment.host)
        except RuntimeError as e:
            log.error("%s", e)


# ------------------------------------------------------------------ the user
class InspectionUser(HttpUser):
    """A camera station: posts one part image after another, with a short think time."""

    wait_time = between(0.0, 0.05)
    batch = int(os.environ.get("MSFLOW_LOAD_BATCH", "4"))
    job_timeout = float(os.environ.get("MSFLOW_LOAD_JOB_TIMEOUT", "30"))

    def on_start(self) -> None:
        _prepare(self.host)
        self.client.headers.update(_headers())

    def _pick(self, n: int = 1) -> tuple[str, list[bytes]]:
        category = random.choices(_Shared.categories, weights=_Shared.weights, k=1)[0]
        return category, random.choices(_Shared.images[category], k=n)

    def _inspect(self, heatmap: str, n: int = 1) -> dict | None:
        category, images = self._pick(n)
        files = [("file", (f"part{i}.png", data, "image/png")) for i, data in enumerate(images)]
        name = f"/v1/inspect/[category]?heatmap={heatmap}" + (f" [x{n}]" if n > 1 else "")
        with self.client.post(f"/v1/inspect/{category}", params={"heatmap": heatmap}, files=files,
                              name=name, timeout=REQUEST_TIMEOUT, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return None
            try:
                body = resp.json()
            except ValueError:
                resp.failure("response is not JSON")
                return None
            problem = check_inspect(body, category, n, heatmap)
            if problem:
                resp.failure(problem)
                return None
            resp.success()
            return body

    @task(8)
    @tag("fast")
    def inspect_fast(self) -> None:
        """One image, score only: what a production line does almost all the time."""
        self._inspect("none")

    @task(2)
    @tag("batch")
    def inspect_batch(self) -> None:
        """Several images in one request (multipart with several ``file`` parts)."""
        if self.batch > 1:
            self._inspect("none", self.batch)

    @task(2)
    @tag("heatmap")
    def inspect_inline_heatmap(self) -> None:
        self._inspect("inline")

    @task(1)
    @tag("redis")
    def inspect_heatmap_url(self) -> None:
        """``heatmap=url``, then fetch the link (heatmaps live in Redis): Redis only."""
        if not _Shared.redis:
            return
        body = self._inspect("url")
        if body is None:
            return
        link = heatmap_link(body["results"][0]["heatmap"])
        with self.client.get(link, name="/v1/heatmaps/[id].png", timeout=REQUEST_TIMEOUT,
                             catch_response=True) as resp:
            if resp.status_code != 200 or not resp.content.startswith(PNG_SIGNATURE):
                resp.failure(f"heatmap link: HTTP {resp.status_code}, {resp.headers.get('content-type')}")

    @task(1)
    @tag("redis")
    def inspect_job(self) -> None:
        """Async path: ``POST /v1/jobs/{category}``, then poll ``GET /v1/jobs/{id}``: Redis only."""
        if not _Shared.redis:
            return
        category, images = self._pick(1)
        with self.client.post(f"/v1/jobs/{category}", files=[("file", ("part.png", images[0], "image/png"))],
                              name="/v1/jobs/[category]", timeout=REQUEST_TIMEOUT, catch_response=True) as resp:
            if resp.status_code not in (200, 201, 202):
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                body = resp.json()
                job_id = body.get("id") or body.get("job_id")
            except (ValueError, AttributeError):
                job_id = None
            if not job_id:
                resp.failure("no job id in the response")
                return
        deadline = time.monotonic() + self.job_timeout
        while True:
            with self.client.get(f"/v1/jobs/{job_id}", name="/v1/jobs/[id]", timeout=REQUEST_TIMEOUT,
                                 catch_response=True) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    return
                try:
                    body = resp.json()
                except ValueError:
                    resp.failure("response is not JSON")
                    return
                status = str(body.get("status", "")).lower()
                if status in ("done", "completed", "complete", "succeeded", "success", "finished"):
                    result = body.get("result")
                    problem = (check_inspect(result, category, 1, "any") if isinstance(result, dict)
                               else "finished job has no result object")
                    if problem:
                        resp.failure(f"job result: {problem}")
                    return
                if status in ("failed", "error", "cancelled"):
                    resp.failure(f"job {status}: {body.get('error')}")
                    return
                if time.monotonic() > deadline:
                    resp.failure(f"job not finished after {self.job_timeout:.0f}s (status {status!r})")
                    return
                resp.success()
            time.sleep(0.1)
