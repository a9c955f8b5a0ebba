"""``msflow serve``: one server process, or a supervisor of front ends and one engine process.

With ``MSFLOW_API_PROCESSES`` = 1 (the default) the whole service runs in this process
(:func:`service.server.run_server`). With N > 1 this process binds the port and supervises:

* N front-end processes (``msflow-api-<i>``): uvicorn on a listening socket of its own on the
  one port (``SO_REUSEPORT``), the whole HTTP API, decode, postprocess, result cache, review
  capture; each a normal
  :class:`~service.pipeline.state.ServiceState` whose lanes reach the engine process
  (:mod:`service.pipeline.engine_client`);
* one engine process (``msflow-engine``, :mod:`service.engine_core`): every engine, and
  the only place batches form, so N front ends do not split a category's batches N ways.

Why processes at all: one process shares one GIL between HTTP, decode and encode; at about
1.4 ms of Python per image it tops out near 700 images/s (docs/performance-log.md), far below
what one GPU can score. Why one engine process rather than an engine per front end: batch
size is what makes a GPU efficient, and N engines would also hold N copies of each model.

Why a socket per front end: on one shared socket the kernel hands each new connection to
whichever process accepts first, so a few long-lived keep-alive clients can all land on one
front end (measured: 8 of 8). With ``SO_REUSEPORT`` the kernel spreads connections over the
front ends by hash. Each front end's socket is bound here but only starts listening when its
uvicorn serves, so no connection waits on a process still starting; it closes with the
process, so none waits on a dead one either. This process keeps the port with a bound socket
that never listens.

Children die with this process (``PR_SET_PDEATHSIG``) and are restarted when they die
alone, and a front end whose event loop has not run for ``MSFLOW_FRONTEND_STALL_S`` (stopped,
or stuck in a call that never returns: its socket stays on the port and the kernel goes on
handing it connections, which would wait for as long as it stays stuck) is killed first;
shared memory needs no cleaning after any of these deaths (:mod:`service.ipc.slab`).
A front end's ``heatmap=url`` links are files in its folder of the run directory, which every
front end reads (:class:`service.redisq.store.FolderLinks`); a dead front end's folder is
removed here before its replacement starts, and the run directory when this process stops.
On SIGTERM/SIGINT the front ends stop first (readiness off, requests in flight finish,
their images still get engine time), then the engine process drains and exits.

Modules: :mod:`.supervisor` (the process tree: start, watch, ordered stop), :mod:`.children`
(one child: start, restart back-off, heartbeats), :mod:`.port` (the socket per front end),
:mod:`.run_dir` (the run directory and its sweep).
"""

from __future__ import annotations

import argparse
import logging

from service.config import warn_unknown_env
from service.server import build_overrides, build_settings, run_server
from service.supervisor.supervisor import Supervisor


def serve(args: argparse.Namespace) -> int:
    settings = build_settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_unknown_env()
    if settings.api_processes == 1:
        return run_server(settings)
    return Supervisor(settings, build_overrides(args)).run()

