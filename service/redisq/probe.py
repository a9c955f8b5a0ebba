"""A periodic PING of Redis for monitoring (``msflow_redis_up``), traffic or not.

``msflow_redis_errors_total`` counts calls that failed, and calls come from traffic: a Redis
down while no request arrived (a night shift's idle line, the jobs' API quiet) made none, so
``MsflowRedisErrors`` stayed quiet until the first client met the outage. So every API
process and every worker PINGs Redis every ``MSFLOW_REDIS_PROBE_S`` on a task of its own (off
the request path) and reports whether it answered; ``MsflowRedisDown`` fires on it.

The PING is :meth:`~service.redisq.connection.RedisConnection.answers`: bounded (~0.5 s at
the defaults, whatever the socket timeout), one slot of the connection's budget, and it
neither opens nor closes the hot path's breaker nor counts as a failed call (the gauge at 0
says it; counted too, the error rate would depend on this period). It does not hold a
worker's claims off either, as its failed calls do (``Worker.redis_failed``): a Redis slow
once in a while would fail the PING's short bound every so often and a worker would never
claim (docs/DESIGN.md, the claim hold-off).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.redisq.connection import RedisConnection

async def probe_forever(conn: RedisConnection, report: Callable[[bool], None], every_s: float) -> None:
    """PING now and every ``every_s`` until cancelled; ``report(answered)`` after each."""
    while True:
        report(await conn.answers())
        await asyncio.sleep(every_s)


__all__ = ["probe_forever"]
