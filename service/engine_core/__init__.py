"""The engine process of a multi-process server: every engine, and the one place batches form.

``msflow serve`` with ``MSFLOW_API_PROCESSES`` = N > 1 runs N front-end processes (HTTP,
decode, postprocess; :mod:`service.server`) and this one process per device, the split vLLM
makes between its API server and its ``EngineCore``. Front ends connect over a Unix socket
(:mod:`service.ipc.channel`) and hand over a shared-memory slab per input size
(:mod:`service.ipc.slab`); a request then costs two small packed frames
(:mod:`service.ipc.frames`):

``submit (rid, handle, slab, deadline, slots)``  ->  one :class:`~service.pipeline.batcher.Batcher`
per loaded version folder (``handle``: its number, given on ``acquire``), shared by every
front end -> the engine reads the inputs from the slots and writes the maps into them ->
``result (rid, outcomes)``.

* :mod:`~service.engine_core.core`: :class:`EngineCore`, which accepts front ends, reads
  their messages and hands each one to the part that owns it. A front end that goes away
  (crash included) releases what it held and its queued images are dropped; its slabs are
  unmapped once the last batch that reads them is done (one slab alone on ``drop_slab``,
  when its category retired there).
* :mod:`~service.engine_core.hosting`: the engines by version folder, loaded on a front
  end's ``acquire`` and unloaded a grace period after the last release, and their batchers
  (a front end's warm-up, a ``warm`` message, runs there too but no metric observes it).
* :mod:`~service.engine_core.relay`: what front ends ask of each other (an operator's
  ``reload``, replayed to those that connect later until a store watch ``retired`` its
  category; a ``gather`` of what each one holds).
* :mod:`~service.engine_core.frontend`: the process's view of one front end;
  :mod:`~service.engine_core.main`: the process around the core.
"""

from service.engine_core.core import AcceptLoopDied, EngineCore
from service.engine_core.frontend import FrontEnd
from service.engine_core.main import run_engine_process

__all__ = ["AcceptLoopDied", "EngineCore", "FrontEnd", "run_engine_process"]
