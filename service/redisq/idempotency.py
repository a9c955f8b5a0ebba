"""Idempotent job submission: the job id a client's ``Idempotency-Key`` names, and what a
request asked for (:func:`request_digest`), so that the key sent again with another request
is told apart from a resubmission (:class:`IdempotencyConflict`). The queue that uses them
is :mod:`service.redisq.jobs`."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from service.schemas import InspectOptions, Upload

# A request's images hashed on the event loop up to this; beyond, in a thread.
INLINE_DIGEST_BYTES = 1 << 20


def job_id_for(category: str, idempotency_key: str, client: str = "") -> str:
    """The job id of a client's idempotency key (same shape as :func:`~service.redisq.records.new_job_id`).

    ``client`` scopes the key to whoever sent it (the API's digest of the presented API key;
    empty on an open API): derived from the category and the key alone, any client with any
    key who guessed another's Idempotency-Key ("order-1") computed that job's id, read its
    results, and made the owner's own request a 409."""
    digest = hashlib.sha256(f"{category}\0{client}\0{idempotency_key}".encode()).digest()[:18]
    return base64.urlsafe_b64encode(digest).decode("ascii")


def request_digest(category: str, uploads: Sequence[Upload], options: InspectOptions) -> str:
    """What a job asks for, as one sha256: the category, the options, and each image's name and
    bytes (by their own sha256), in order."""
    h = hashlib.sha256(f"{category}\0{options.model_dump_json()}\0{len(uploads)}".encode())
    for upload in uploads:
        h.update(f"\0{upload.filename or ''}\0".encode())
        h.update(hashlib.sha256(upload.data).digest())
    return h.hexdigest()


class IdempotencyConflict(ValueError):
    """An Idempotency-Key sent again with another request (other images, names or options)
    than the job it named: answering that job would hand back another request's result."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was used for another request (job {job_id}: other images, "
                         "file names or options); use a new key for a new request")
        self.job_id = job_id


class IdempotentJobUnreadable(ValueError):
    """The job an Idempotency-Key names has a stored record this version cannot read (another
    version's, or damaged): whether it was this request cannot be told, and answering a fresh
    "queued" record would name a job that was never queued."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"the stored record of this Idempotency-Key's job {job_id} cannot be read ({reason}); "
                         "use a new key for a new request")
        self.job_id = job_id


__all__ = ["INLINE_DIGEST_BYTES", "IdempotencyConflict", "IdempotentJobUnreadable", "job_id_for", "request_digest"]
