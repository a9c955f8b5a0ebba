"""Shared parts of the tests of a served model's routes (``test_defect_regions``,
``test_threshold_api``, ``test_model_assets_and_console``): a real ``msflow serve`` of the
session's tiny trained model over the module's own store copy (user and admin keys, an
anomaly-rate window of :data:`RATE_WINDOW` images), a client of it with the user's key, the
demo test images, and a helper posting images to inspect. Test modules import this, never
each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import ADMIN_KEY, CATEGORY, USER_KEY, Server, client_for, served

INSPECT = f"/v1/inspect/{CATEGORY}"
RATE_WINDOW = 4


@pytest.fixture(scope="module")
def server(module_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(module_store, tmp_path_factory.mktemp("logs") / "regions.log", api_keys=USER_KEY, admin_api_keys=ADMIN_KEY,
                max_batch_size=8, max_queue_delay_ms=5, anomaly_rate_window=RATE_WINDOW,
                max_files_per_request=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with client_for(server, USER_KEY, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def samples(demo_test_images: dict[str, list[Path]]) -> dict[str, list[Path]]:
    return demo_test_images


def inspect(client: httpx.Client, paths: list[Path], **params: str) -> list[dict]:
    r = client.post(INSPECT, params={"heatmap": "none", **params},
                    files=[("file", (p.name, p.read_bytes(), "image/png")) for p in paths])
    assert r.status_code == 200, r.text
    return r.json()["results"]
