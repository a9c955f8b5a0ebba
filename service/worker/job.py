"""One job in a worker's hand (:class:`JobInHand`): its delivery, its record, its images once
fetched, and its run through the pipeline runtime (:func:`run_job`), whose failure stays the
job's. What takes, fetches and records jobs is :mod:`service.worker.runner`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

from service.pipeline.item import InspectedImage
from service.pipeline.runtime import Lane, PipelineRuntime
from service.redisq.jobs import Delivery
from service.redisq.records import JobRecord
from service.redisq.store import utcnow
from service.schemas import InspectResponse, Upload
from service.worker.failures import JobFailed, job_failure

# A job's images must reach the engine within this, or the attempt fails and is retried: a
# wedged engine must not hold jobs forever (their claim is kept alive meanwhile, so nobody
# else would take them). Far above any queueing a healthy worker sees.
JOB_DEADLINE_S = 600.0


@dataclass
class JobInHand:
    delivery: Delivery
    record: JobRecord  # "running", written once its inputs have room (the runner's _fetch)
    size: int  # its images' bytes: taken from the input budget before they are fetched
    holding: bool = False  # its size is taken from the input budget (until its images are dropped)
    data: list[bytes] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)  # reset when fetched: the deadline excludes a wait for room
    items: list[InspectedImage] = field(default_factory=list)  # one record per image, filled by the pipeline
    error: JobFailed | None = None


async def run_job(runtime: PipelineRuntime, lane: Lane, job: JobInHand) -> None:
    """The runtime's inspect path for one job; its failure stays in ``job.error``."""
    record = job.record
    job.error, job.items, job.started = None, [], time.monotonic()  # a rerun starts afresh
    if not job.data or len(job.data) != len(record.filenames):
        job.error = JobFailed("inputs_missing", "the job's images are gone (expired or never stored)",
                              permanent=True)
        return
    # Time in the stream counts as queueing, like the batcher's: both are waits before the engine.
    waited_ms = max(0.0, (utcnow() - _aware(record.created_at)).total_seconds() * 1e3)
    job.items = [InspectedImage.received(i, Upload(filename=name, data=data), queue_ms=waited_ms)
                 for i, (name, data) in enumerate(zip(record.filenames, job.data))]
    try:
        await runtime.run(lane, job.items, record.options, job.started + JOB_DEADLINE_S, job.started,
                          wait_for_room=True)
    except Exception as exc:  # every failure stays the job's: its code and retry policy in failures.py
        job.error = job_failure(exc, record.id, job.items)
    else:
        results = [item.answer for item in job.items]
        response = InspectResponse(request_id=record.request_id or record.id, category=lane.model.category,
                                   model_version=results[0].model_version, engine=lane.model.engine.name,
                                   results=results)
        job.record = record.model_copy(update={"status": "done", "result": response, "error": None,
                                               "updated_at": utcnow()})


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


__all__ = ["JOB_DEADLINE_S", "JobInHand", "run_job"]
