"""service/redisq/connection.py against a real redis-server: a burst larger than the pool
waits its turn or is refused, and is not taken for an outage; a readiness PING only looks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from harness import PREFIX, RedisServer
from service.config import Settings
from service.redisq.connection import RedisConnection, RedisUnavailable


def test_a_burst_past_the_pool_waits_or_is_refused_and_the_breaker_stays_closed(redis_server: RedisServer) -> None:
    """redis-py raised MaxConnectionsError past its pool, which tripped the breaker: a burst of
    300 requests for unknown heatmap links turned Redis off for every request for 3 s."""
    settings = Settings(redis_url=redis_server.url, redis_prefix=PREFIX, model_store=Path("."),
                        redis_max_connections=2, redis_socket_timeout_s=0.25, redis_breaker_s=30.0)

    async def main() -> None:
        conn = RedisConnection(settings)
        key = conn.key("burst")

        async def slow_read(client):  # holds its connection's slot for 50 ms
            value = await client.get(key)
            await asyncio.sleep(0.05)
            return value

        async def one() -> str:
            try:
                await conn.run("burst", slow_read)
                return "ok"
            except RedisUnavailable as exc:
                assert "busy" in str(exc), exc
                return "busy"

        try:
            outcomes = await asyncio.gather(*(one() for _ in range(40)))
            assert outcomes.count("ok") >= 4  # two at a time for the quarter second they wait
            assert outcomes.count("busy") >= 10  # the rest: refused, not queued without end
            assert not conn.skipping  # not an outage: Redis stays on for everyone else
            assert await conn.run("after", lambda client: client.ping()) is True
            assert len(conn.client.connection_pool._in_use_connections) == 0
        finally:
            await conn.aclose()

    asyncio.run(main())


def test_a_readiness_probe_during_a_burst_reports_ok_and_leaves_the_breaker_closed(redis_server: RedisServer) -> None:
    """/readyz's PING takes no slot: with every connection busy, the pool refused it, and the
    refusal tripped the breaker (Redis off for every request) and said "degraded"."""
    settings = Settings(redis_url=redis_server.url, redis_prefix=PREFIX, model_store=Path("."),
                        redis_max_connections=2, redis_socket_timeout_s=1.0, redis_breaker_s=30.0)

    async def main() -> None:
        conn = RedisConnection(settings)
        try:
            busy = [asyncio.create_task(conn.run("busy", lambda r: r.blpop([conn.key("nothing")], timeout=0.3)))
                    for _ in range(2)]
            await asyncio.sleep(0.05)  # both connections are in their BLPOP
            assert await conn.status() == "ok"
            assert not conn.skipping
            await asyncio.gather(*busy)
            assert await conn.run("after", lambda client: client.ping()) is True
        finally:
            await conn.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("max_connections", [1, 3])
def test_calls_never_hold_more_connections_than_the_budget(redis_server: RedisServer, max_connections: int) -> None:
    settings = Settings(redis_url=redis_server.url, redis_prefix=PREFIX, model_store=Path("."),
                        redis_max_connections=max_connections, redis_socket_timeout_s=5.0)

    async def main() -> None:
        conn = RedisConnection(settings)

        async def read(client):
            await client.get(conn.key("x"))
            await asyncio.sleep(0.005)
            return True

        try:
            # All wait their turn (past redis-py's pool each raised MaxConnectionsError before)
            assert all(await asyncio.gather(*(conn.run("read", read) for _ in range(30))))
            pool = conn.client.connection_pool
            assert 1 <= len(pool._available_connections) + len(pool._in_use_connections) <= max_connections
            assert not conn.skipping
        finally:
            await conn.aclose()

    asyncio.run(main())


def test_a_readiness_ping_looks_and_never_opens_or_closes_the_breaker(private_redis: RedisServer) -> None:
    """``status`` (``/readyz``) reports Redis as the hot path gets it and changes nothing: a
    PING that timed out during a half-second stall opened the breaker (Redis off for every
    request for ``redis_breaker_s``), and one that succeeded closed a breaker the hot path
    had opened."""
    settings = Settings(redis_url=private_redis.url, redis_prefix=PREFIX, model_store=Path("."),
                        redis_socket_timeout_s=0.25, redis_breaker_s=30.0)
    assert private_redis.proc is not None
    pid = private_redis.proc.pid

    async def main() -> None:
        conn = RedisConnection(settings)
        try:
            assert await conn.status() == "ok"
            os.kill(pid, signal.SIGSTOP)  # hung: no answer, no reset
            try:
                started = time.monotonic()
                assert await conn.status() == "degraded"
                took = time.monotonic() - started
                assert not conn.skipping, "a readiness probe opened the hot path's breaker"
            finally:
                os.kill(pid, signal.SIGCONT)
            assert took < 1.0, f"a PING took {took:.2f} s with Redis hung"
            assert await conn.run("after", lambda client: client.ping()) is True

            os.kill(pid, signal.SIGSTOP)  # now the hot path fails: its breaker opens
            try:
                with pytest.raises(RedisUnavailable):
                    await conn.run("get", lambda client: client.get(conn.key("x")))
            finally:
                os.kill(pid, signal.SIGCONT)
            assert conn.skipping
            assert await conn.status() == "degraded"  # Redis answers, but the hot path skips it
            assert conn.skipping, "a readiness probe closed the hot path's breaker"
        finally:
            os.kill(pid, signal.SIGCONT)
            await conn.aclose()

    asyncio.run(main())


def test_a_call_on_a_hung_redis_ends_within_its_bound_on_new_connections_too(private_redis: RedisServer) -> None:
    """A hot-path call on a hung Redis fails within (retries + 1) x (timeout + 50 ms), ~0.6 s at
    the defaults, whatever redis-py spends on a new connection's handshake: calls that each
    needed a connection of their own took 1.07 s (a connect's CLIENT SETNAME timed out and was
    retried before the command's own two tries), and a request with a 800 ms deadline spent it
    on the cache lookup and answered 504."""
    settings = Settings(redis_url=private_redis.url, redis_prefix=PREFIX, model_store=Path("."),
                        redis_socket_timeout_s=0.25, redis_connect_timeout_s=0.25, redis_retries=1,
                        redis_breaker_s=0.0)
    assert private_redis.proc is not None
    pid = private_redis.proc.pid

    async def main() -> None:
        conn = RedisConnection(settings)

        async def timed() -> float:
            started = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await conn.run("cache_get", lambda client: client.mget([conn.key("x")]))
            return time.monotonic() - started

        try:
            assert await conn.run("warm", lambda client: client.ping()) is True  # one pooled connection
            os.kill(pid, signal.SIGSTOP)
            try:
                took = await asyncio.gather(*(timed() for _ in range(4)))  # three need new connections
            finally:
                os.kill(pid, signal.SIGCONT)
            assert max(took) < 0.75, f"calls on a hung Redis took {[round(t, 2) for t in took]} s"
            assert await conn.run("after", lambda client: client.ping()) is True
        finally:
            os.kill(pid, signal.SIGCONT)
            await conn.aclose()

    asyncio.run(main())
