"""Cancellations that Python 3.11's ``asyncio.wait_for`` drops (CPython gh-86296): cancelled in
the event-loop iterations where the awaitable it waits on has just completed, it returns that
result instead of raising, and the cancelled task goes on. Each test cancels at every one of
the first iterations after the wait ends, where the lost cancellations fall (as
tests/integration/test_redis_task_cancellation.py does for Redis calls). The service waits
with ``asyncio.timeout`` instead, which keeps every cancellation on 3.11 too.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import service
from service.config import Settings
from service.pipeline.engine_client import EngineClient

ITERATIONS = 8  # loop iterations after the wait ended at which the cancellation comes


def test_a_call_cancelled_as_the_engine_process_connects_is_not_sent(tmp_path: Path) -> None:
    """A call (a model's acquire, a reload) waiting for the engine process's connection is
    cancelled at each iteration after the connection comes. Before: at iterations 0-2 it went on
    and sent its call (the engine process loaded a model for a load cancelled at shutdown),
    then waited for an answer nobody would read."""

    async def main() -> list[int]:
        lost = []
        for k in range(ITERATIONS):
            client = EngineClient(Settings(model_store=tmp_path), tmp_path / "engine.sock")
            client._loop = asyncio.get_running_loop()
            sent: list[dict[str, Any]] = []
            client._send = sent.append  # type: ignore[method-assign]  # no connection: what would go
            call = asyncio.create_task(client._call({"op": "acquire", "dir": "x"}))
            await asyncio.sleep(0.01)  # waiting for the connection
            client._connected.set()
            for _ in range(k):
                await asyncio.sleep(0)
            sent_before = len(sent)  # sent before the cancellation: as it should be
            call.cancel()
            await asyncio.wait([call], timeout=0.1)
            if len(sent) > sent_before:
                lost.append(k)
            call.cancel()
        return lost

    lost = asyncio.run(main())
    assert lost == [], f"calls sent after their cancellation (at loop iterations {lost})"


def test_the_service_never_waits_with_asyncio_wait_for() -> None:
    """Each ``asyncio.wait_for`` in the service lost cancellations on 3.11 where it stood (a
    stopped task that went on, a stop that never returned): ``asyncio.timeout`` instead."""
    root = Path(service.__file__).parent
    found = [f"{path.relative_to(root)}:{node.lineno}" for path in sorted(root.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "wait_for"]
    assert found == [], f"asyncio.wait_for in the service (use asyncio.timeout): {found}"
