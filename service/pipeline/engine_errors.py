"""What a front end raises when the engine process cannot answer (multi-process mode)."""

from __future__ import annotations

from service.pipeline.batch_queue import BatcherError


class EngineUnavailable(BatcherError):
    """The engine process is not reachable right now (restarting): answer 503 + Retry-After."""
