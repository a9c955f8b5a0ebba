"""Between the processes of one server: shared-memory slabs and a message channel.

``msflow serve`` with ``MSFLOW_API_PROCESSES`` > 1 runs several front-end processes (HTTP,
decode, postprocess) and one engine process (batching, engines). Pixels and maps cross in
shared memory (:mod:`service.ipc.slab`); only small JSON messages cross the socket
(:mod:`service.ipc.channel`). Nothing here knows engines, pipelines or HTTP.
"""
