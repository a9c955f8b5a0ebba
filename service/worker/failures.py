"""What a failed job attempt records: its error code, whether another attempt could succeed
(``permanent``: the input itself is bad, so the job is dead-lettered at once), and a message
that names no internals (engine runtimes, paths: the worker's log has those)."""

from __future__ import annotations

import logging
from typing import Any

from service.pipeline.admission import AdmissionRefused, RequestTooExpensive
from service.pipeline.batch_queue import BatcherClosed, BatcherError, DeadlineExceeded, QueueFull
from service.pipeline.decode import ImageRejected
from service.pipeline.item import InspectedImage
from service.pipeline.postprocess import NonFiniteOutput
from service.redisq.connection import RedisUnavailable
from service.schemas import ErrorBody

log = logging.getLogger("service.worker")

# Errors of the batcher stage -> the job's error code.
_BATCHER_CODES: dict[type[BatcherError], str] = {
    QueueFull: "queue_full", BatcherClosed: "shutting_down", DeadlineExceeded: "deadline_exceeded"}
# An unexpected error, by the least advanced image of the job (InspectedImage.stage): which
# stage failed. An engine failure (the batch's, already logged by the batcher) is "decoded".
_STAGES = ("received", "decoded", "scored", "answered")
_STAGE_CODES: dict[str, str] = {"received": "decode_error", "decoded": "engine_error", "scored": "postprocess_error"}
_PUBLIC_FAILURES: dict[str, str] = {"decode_error": "decoding the job's images failed",
                                    "engine_error": "the engine failed on this job's batch",
                                    "postprocess_error": "rendering the job's results failed"}


class JobFailed(Exception):
    """One job's attempt failed (bad input, engine error): recorded, retried or dead-lettered.
    ``permanent``: another attempt would fail the same way (the input itself is bad), so the
    job is dead-lettered at once instead of costing more attempts. ``details``: what the
    synchronous answer's error carries too (the bad image's ``index`` and ``filename``, the
    megapixels over budget), so a job's client can point at the image as a caller of
    ``POST /v1/inspect`` can. ``outputs_unstored``: the job ran, Redis could not store what it
    made (heatmap links): Redis's fault, so the worker runs it again in hand once Redis
    answers (a bounded number of times) before the attempt counts."""

    def __init__(self, code: str, message: str, permanent: bool = False, details: Any = None,
                 outputs_unstored: bool = False) -> None:
        super().__init__(message)
        self.error = ErrorBody(code=code, message=message, details=details)
        self.permanent = permanent
        self.outputs_unstored = outputs_unstored


def job_failure(exc: Exception, job_id: str, items: list[InspectedImage]) -> JobFailed:
    """The failure an attempt records for ``exc``, raised by the runtime's inspect path for the
    job's ``items`` (whose stages tell how far it got)."""
    if isinstance(exc, (ImageRejected, RequestTooExpensive)):  # the bytes will not get cheaper next time
        return JobFailed(exc.code, exc.message, permanent=True, details=exc.details)
    if isinstance(exc, NonFiniteOutput):  # never a verdict: the job fails with the reason
        return JobFailed(exc.code, str(exc), permanent=True, details=exc.details)
    if isinstance(exc, RedisUnavailable):
        log.warning("job %s: cannot store its heatmap links: %s", job_id, exc)
        return JobFailed("redis_unavailable", "cannot store the heatmap links: Redis is unavailable",
                         outputs_unstored=True)
    if isinstance(exc, BatcherError):
        return JobFailed(_BATCHER_CODES.get(type(exc), "engine_error"), str(exc))
    if isinstance(exc, AdmissionRefused):  # no room in the pixel budget before the job's deadline: retried
        return JobFailed(exc.code, exc.message, details=exc.details)
    # The engine's batch failed, or a bug.
    stage = min((item.stage for item in items), key=_STAGES.index)
    if stage != "decoded":
        log.error("job %s: failed after its images were %s", job_id, stage, exc_info=exc)
    else:
        log.warning("job %s: the engine failed on its batch: %s: %s", job_id, type(exc).__name__, exc)
    code = _STAGE_CODES.get(stage, "internal_error")
    # The exception's text is internal (engine runtime, paths): the log has it, the record a fixed message.
    return JobFailed(code, f"{_PUBLIC_FAILURES.get(code, 'the job failed')} (job {job_id}; "
                           "the worker's log has the details)")


__all__ = ["JobFailed", "job_failure"]
