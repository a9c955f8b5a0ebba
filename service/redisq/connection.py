"""The Redis connection of the API and the worker, behind a circuit breaker.

Connection settings (URL incl. ``rediss://`` TLS, password, timeouts, retries, health
checks) come from :class:`~service.config.Settings`. An outage must not stall requests: the
API's commands have short socket and connect timeouts (0.25 s by default), redis-py retries
once on a connection error, and after a failure :class:`RedisConnection` fails fast for
``redis_breaker_s`` before trying Redis again. redis-py's pool reconnects by itself once
Redis is back (``health_check_interval`` PINGs a connection idle that long before reuse).

The pool holds ``redis_max_connections``, and calls take a slot of as many before they run,
waiting up to the command timeout for one: a burst of requests waits its turn or gets 503,
and the breaker stays closed. Before, redis-py raised ``MaxConnectionsError`` past its pool's
100 connections, which tripped the breaker: 300 concurrent requests for unknown heatmap links
turned Redis off for every request (cache, links, thresholds) for ``redis_breaker_s``, and a
client repeating the burst kept it off.

A readiness probe only looks (:meth:`RedisConnection.status`): its PING neither opens the
breaker nor closes it. It did both: one ``/readyz`` during a Redis stall of half a second
turned Redis off for the hot path for ``redis_breaker_s`` (the next inspection skipped the
cache and kept its heatmap link in this process's memory, where no other replica finds it),
and a PING that succeeded closed a breaker the hot path had opened.

A call of the connection made from the settings (the hot path's) is bounded as a whole by
:func:`hung_bound` (~0.6 s at the defaults): redis-py's timeouts are per socket read, and a
call that needed a new connection spent 0.5 s more on its handshake (CLIENT SETNAME timed out,
then retried) before its own two tries; on a hung Redis such calls took 1.07 s, and a request
with an 800 ms deadline spent it on the cache lookup and answered 504.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import MaxConnectionsError, RedisError, ResponseError

from service.config import Settings
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class RedisUnavailable(RuntimeError):
    """Redis is not configured, unreachable, or skipped for a while after a failure."""


def make_client(settings: Settings, socket_timeout: float | None = None) -> aioredis.Redis:
    """An asyncio client from the settings (URL incl. ``rediss://``, password, timeouts)."""
    if not settings.redis_url:
        raise RedisUnavailable("no Redis configured (MSFLOW_REDIS_URL)")
    kwargs: dict[str, Any] = dict(
        socket_timeout=socket_timeout or settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        health_check_interval=settings.redis_health_check_interval_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), settings.redis_retries),
        max_connections=settings.redis_max_connections, client_name="msflow", protocol=2)
    if settings.redis_password:
        kwargs["password"] = settings.redis_password  # a password in the URL wins
    if settings.redis_url.startswith("rediss://") and settings.redis_ssl_ca_certs:
        kwargs["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    return aioredis.Redis.from_url(settings.redis_url, **kwargs)


def hung_bound(settings: Settings) -> float:
    """How long a hot-path call (or a probe's PING) may take when Redis does not answer: each
    try's timeout, plus the retries' backoff."""
    s = settings
    return (s.redis_retries + 1) * (max(s.redis_socket_timeout_s, s.redis_connect_timeout_s) + 0.05)


class RedisConnection:
    """A client, the key prefix and a circuit breaker: after a failure every call fails fast
    with :class:`RedisUnavailable` for ``redis_breaker_s``, then Redis is tried again."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None,
                 client: aioredis.Redis | None = None, breaker_s: float | None = None) -> None:
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.client = client if client is not None else make_client(settings)
        self.metrics = metrics
        self.breaker_s = settings.redis_breaker_s if breaker_s is None else breaker_s
        self._skip_until = 0.0
        self._slots = asyncio.Semaphore(settings.redis_max_connections)  # at most the pool's connections
        # A client of its own has timeouts of its own (job payloads, a worker's blocking read): unbounded here.
        self._bound_s: float | None = hung_bound(settings) if client is None else None

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def skipping(self) -> bool:
        return time.monotonic() < self._skip_until

    async def run(self, op: str, fn: Callable[[aioredis.Redis], Awaitable[_T]], payload_bytes: int = 0) -> _T:
        """``await fn(client)``; any Redis or socket failure becomes :class:`RedisUnavailable`.
        ``payload_bytes``: what the call moves (a heatmap, a request's cached results) adds its
        time at 50 MB/s to the bound, as the jobs' connection sizes its timeout."""
        if self.skipping:
            self._count(op)
            raise RedisUnavailable(f"Redis is unavailable (not retried for {self._skip_until - time.monotonic():.1f} s "
                                   "after a failure); retry later")
        if self._slots.locked():  # every connection busy: wait for one as long as for a command
            try:
                async with asyncio.timeout(self.settings.redis_socket_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                self._count(op)
                raise RedisUnavailable(f"all {self.settings.redis_max_connections} Redis connections of this "
                                       "server process are busy; retry shortly") from None
        else:
            await self._slots.acquire()  # returns at once
        try:
            async with asyncio.timeout(None if self._bound_s is None else self._bound_s + payload_bytes / 50e6):
                result = await fn(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            # ResponseError: Redis answered (an error of the command, not of the link);
            # MaxConnectionsError: a pool shared beyond these slots is full, Redis is fine
            if isinstance(exc, (ResponseError, MaxConnectionsError)):
                self._count(op)
            else:
                self._trip(op, exc)
            raise RedisUnavailable(f"Redis is unavailable ({op} failed: {exc or type(exc).__name__}); retry later") from exc
        finally:
            self._slots.release()
        self._skip_until = 0.0
        return result

    async def get_bounded(self, op: str, keys: Sequence[str], limit: int) -> list[bytes | None]:
        """Each key's value (as MGET: None for a missing key or one not a string), in one round
        trip, but never more than ``limit + 1`` bytes of one: a key holding more than anything
        this server writes there (another writer's, or garbage) was read whole, 64 MB into the
        process per read. The caller refuses a value longer than ``limit``."""
        async def read(r: aioredis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 0, limit)
            return await pipe.execute(raise_on_error=False)

        values = await self.run(op, read)  # no payload allowance: MGET's bound, what callers rely on
        # GETRANGE answers a missing key empty and one of another type with an error; nothing
        # this server writes is empty
        return [value if isinstance(value, bytes) and value else None for value in values]

    async def status(self) -> Literal["ok", "degraded"]:
        """What the hot path gets from Redis now: ``degraded`` while its breaker is open or Redis
        does not answer a PING (:meth:`answers`, counted in ``msflow_redis_errors_total``), else
        ``ok``. Only looks: the PING neither opens nor closes the breaker (a probe must not
        change how the replica serves)."""
        return "ok" if await self.answers(count=True) and not self.skipping else "degraded"

    async def answers(self, count: bool = False) -> bool:
        """Whether Redis answers a PING now, never changing the breaker; a failure is counted in
        ``msflow_redis_errors_total`` when ``count``. It takes a slot of the calls' budget, and
        with every slot busy the calls in flight say Redis answers (unless they tripped the
        breaker); the PING's time is bounded, whatever the socket does (a hung Redis: ~0.5 s,
        where a probe's timeout is seconds, and a worker's socket timeout longer still)."""
        if self._slots.locked():  # every connection busy with calls: Redis answers them
            return not self.skipping
        bound = hung_bound(self.settings)
        await self._slots.acquire()  # returns at once: not locked above, and no await since
        try:
            async with asyncio.timeout(bound):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError) as exc:  # MaxConnectionsError too: a pool shared beyond the slots
            log.debug("Redis ping failed (%s: %s)", type(exc).__name__, exc)
            if count:
                self._count("ping")
            return False
        finally:
            self._slots.release()
        return True

    def _trip(self, op: str, exc: BaseException) -> None:
        if not self.skipping and self.breaker_s > 0:
            log.warning("Redis %s failed (%s: %s); skipping Redis for %.1f s", op, type(exc).__name__, exc,
                        self.breaker_s)
        self._skip_until = time.monotonic() + self.breaker_s
        self._count(op)

    def _count(self, op: str) -> None:
        if self.metrics is not None:
            self.metrics.redis_errors.labels(op).inc()

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass
