"""Fixtures of the integration layer: a private redis-server and the API replicas on it.

Session-scoped, so the test files share one private redis-server and the API replicas on it
(the helpers are in ``tests/harness.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (CATEGORY, PREFIX, REDIS_ADMIN_KEY as ADMIN_KEY, REDIS_USER_KEY as USER_KEY, RedisServer, Server,
                     start_servers, store_copy)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of one test's own: for tests that stall it, change its settings or
    measure its memory."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def good_images(demo_root: Path) -> list[Path]:
    return sorted((demo_root / CATEGORY / "test" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def module_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the model store for one test module (each module asking has its own):
    its tests add versions or write threshold overrides beside a manifest."""
    return store_copy(model_store, tmp_path_factory.mktemp("module-store"))


@pytest.fixture(scope="session")
def redis_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the model store (a test adds a version to it)."""
    return store_copy(model_store, tmp_path_factory.mktemp("redis-e2e"))


@pytest.fixture(scope="session")
def redis_apis(redis_store: Path, redis_server: RedisServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Two replicas on one Redis: ``cached`` (cache on, API keys) and ``plain`` (cache off; the
    jobs API), plus ``local`` without Redis. Heatmap links live 1.5 s."""
    logs = tmp_path_factory.mktemp("redis-logs")
    common = dict(redis_url=redis_server.url, redis_prefix=PREFIX, heatmap_ttl_s=1.5, max_queue_delay_ms=10,
                  max_batch_size=8)
    servers = start_servers({
        "cached": (redis_store, logs / "cached.log", dict(common, api_keys=USER_KEY, admin_api_keys=ADMIN_KEY)),
        "plain": (redis_store, logs / "plain.log", dict(common, cache_enabled=False)),
        "local": (redis_store, logs / "local.log", dict(heatmap_ttl_s=1.5)),
    })
    yield servers
    for server in servers.values():
        server.stop()
