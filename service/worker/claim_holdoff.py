"""How long a worker holds off claiming other workers' pending jobs after Redis failed it (or
after its start), and the two timings that bound it: the keep-alive period of a job in hand
and the worker's socket timeout.

A live holder's job looks idle (XAUTOCLAIM hands it out) only once none of the holder's
keep-alives has reached Redis for ``job_claim_idle_s``, as in an outage longer than that.
Once Redis answers again, each live holder's next keep-alive reaches it within
:func:`claim_hold_off_s`, so a claim made after that takes only dead workers' jobs. Before,
the hold-off was ``job_claim_idle_s`` itself, restarted by any failed call of this worker (a
heartbeat, a keep-alive, one large image fetch timing out): a Redis with a slow command once
a minute (the default claim idle time) held claims off for good, and a dead worker's jobs
waited out their TTL and failed.
"""

from __future__ import annotations

from service.config import Settings

# Bytes a second a worker counts on from a loaded Redis host when sizing its socket timeout
# (as the API's submissions are sized).
FETCH_BYTES_PER_S = 50e6

# Beyond a keep-alive period and one timed-out call: the holder's keep-alives of its other
# categories in the same round (one round trip each), its event loop running late (a GC
# pause) and this worker's own lag between a reply and its next claim.
HOLD_OFF_SLACK_S = 1.0


def socket_timeout_s(settings: Settings) -> float:
    """The worker's socket timeout: XREADGROUP BLOCK must finish inside it, and so must one
    fetch of images (up to the input budget, or one job of max_request_bytes, at 50 MB/s); no
    breaker: a worker has no request to protect, it waits."""
    fetch_bytes = max(settings.max_request_bytes, settings.worker_max_input_bytes)
    return settings.worker_block_s + max(1.0, settings.redis_socket_timeout_s) + fetch_bytes / FETCH_BYTES_PER_S


def keep_alive_every_s(settings: Settings) -> float:
    """How often a worker refreshes its claim on each job in hand (XCLAIM JUSTID): three times
    a claim idle period, so that a keep-alive or two lost to a slow Redis costs nothing. One
    that fails is not retried sooner: the next comes a period later."""
    return max(0.1, settings.job_claim_idle_s / 3)


def claim_hold_off_s(settings: Settings) -> float:
    """How long after Redis answers this worker again (after a failure, or at its start) it
    makes no claim.

    Why this is enough: an outage shared by every worker ends at some moment t0, no later than
    this worker's first answer after it. A holder's keep-alive call in flight at t0 fails by
    t0 + one call attempt (the socket or connect timeout, whichever is longer; an attempt
    sent after t0 is answered, redis-py's retry included); the loop then waits one
    keep-alive period and tries again, and that one reaches Redis. So from t0 + period +
    attempt (+ slack) on, every live holder has refreshed each job in hand, and refreshes
    it every period after, well within job_claim_idle_s: only a dead worker's job is idle
    past it. A longer failure needs no longer hold-off (what counts is how soon after it the
    keep-alives resume), and a failure seen again restarts it: a Redis that keeps failing
    this worker keeps its claims held off, one that fails it once a minute no longer does.
    The period is what every worker of the same job_claim_idle_s keeps (those of the
    versions before this one too), so none of them is assumed faster than it is.

    Never longer than job_claim_idle_s, e86b138's hold-off, so no setting holds claims off
    longer than before. Below 1.5 x (attempt + slack) of claim idle time (10 s at the
    defaults; the tests' few seconds) that is shorter than the bound above: a holder whose
    keep-alive timed out as Redis came back may see its job claimed before its next one, as
    it could before this bound. At the defaults: min(60, 20 + 5.7 + 1) = 26.7 s."""
    attempt_s = max(socket_timeout_s(settings), settings.redis_connect_timeout_s)
    return min(settings.job_claim_idle_s, keep_alive_every_s(settings) + attempt_s + HOLD_OFF_SLACK_S)


__all__ = ["FETCH_BYTES_PER_S", "HOLD_OFF_SLACK_S", "claim_hold_off_s", "keep_alive_every_s", "socket_timeout_s"]
