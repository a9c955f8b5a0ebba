"""``msflow worker``: the process (settings, logging, signals, the metrics port) around a
:class:`~service.worker.consumer.Worker`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

from service.allocator import keep_freed_memory
from service.config import Settings, warn_unknown_env
from service.heap import freeze_startup_objects
from service.pipeline.stall_watch import StallWatch
from service.worker.consumer import Worker

log = logging.getLogger("service.worker")


def run_worker(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if getattr(args, "store", None):
        overrides["model_store"] = args.store
    if getattr(args, "name", None):
        overrides["worker_name"] = args.name
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_unknown_env()
    if not settings.redis_url:
        log.error("msflow worker needs Redis: set MSFLOW_REDIS_URL")
        return 2
    keep_freed_memory(settings.heap_retain_mb << 20)
    freeze_startup_objects()
    return asyncio.run(_main(settings))


async def _main(settings: Settings) -> int:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop.set)
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        # On MSFLOW_HOST, as the API: prometheus-client's default is every interface.
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=worker.metrics.registry)
    # An engine call that never returns ends this worker, whose jobs the others then claim
    # (service/pipeline/stall_watch.py): its heartbeat alone would keep it claiming new ones.
    stall_watch = StallWatch(worker.runtime.lanes.batchers, settings.engine_stall_s)
    stall_watch.start()
    try:
        await worker.run()
    except Exception:
        log.exception("worker %s failed", worker.name)
        return 1
    finally:
        stall_watch.stop()
        await worker.close()
    log.info("worker %s: stopped", worker.name)
    return 0
