"""``msflow worker``: run async inspection jobs from the Redis streams, on this host or any other.

A worker is a peer of the API on the same pipeline: it owns a
:class:`~service.pipeline.runtime.PipelineRuntime` (the registry, lanes and batchers, thread
pool, heatmap links and threshold overrides the API's ``ServiceState`` is built on), joins the
consumer group of each category's stream (:mod:`service.redisq.jobs`) and loops:

1. claim a job left pending by a dead worker or a failed attempt (XAUTOCLAIM), *one at a
   time*, and run it alone: a job that kills its worker takes only itself down, and once
   delivered more than ``job_max_attempts`` times it is dead-lettered alone. None before
   Redis has answered the worker for a keep-alive period plus a timed-out call (since its
   start, or since Redis last failed it; :mod:`service.worker.claim_holdoff`): a live
   holder's keep-alives fail in an outage (one ended just before this worker started too),
   so its jobs look idle until its next one;
2. otherwise read new jobs (XREADGROUP, up to ``max_batch_size`` per category, blocking
   ``worker_block_s``);
3. per category (categories in parallel): pin the category's lane once for the jobs read;
   fetch their images in order as the input budget (``worker_max_input_bytes``, all
   categories together: :mod:`service.worker.inputs`) gives room, those that fit together in
   one round trip (a job larger than the budget alone; the others wait in hand, kept
   alive), and run the jobs fetched through the runtime's inspect path at the same time
   (:meth:`~service.pipeline.runtime.PipelineRuntime.run`: header probe and admission under
   the worker's own pixel budget, where a job waits for room instead of being refused;
   decode, the lane's batcher, postprocess), so the images of concurrent jobs share engine
   batches and every result has exactly the shape and numbers of a synchronous answer. A
   job over the per-request pixel budget fails for good (``too_many_pixels``). Every job
   in hand, of every category, has its claim kept alive until its outcome is recorded. Then each job's final record
   and XACK go in one MULTI. A failed attempt stays pending and is retried after the idle
   timeout; the last allowed attempt sends the job to the dead-letter stream.

Failures stay with their job: a bad image fails its own job only; an engine error fails the
jobs whose images were in that batch (retried). Heatmap links that cannot reach Redis fail
the run (the worker serves no HTTP, so a link only in its memory would be dead), but that is
Redis's fault, not the job's: the job runs again in hand once Redis answers, up to
``OUTPUT_RERUNS`` times, before the attempt counts.

Every 5 s it beats a heartbeat per category into Redis (:mod:`service.redisq.workers`), so
that a job's answer says whether any worker consumes its category. A category the store watch
retires leaves the heartbeat and, once its stream is drained, the reads; one that comes back is
consumed again (:mod:`service.worker.categories`). At its start and every half
``job_consumer_idle_s`` it deletes the consumers of the groups it reads that hold nothing and
have been idle that long (:mod:`service.redisq.consumers`): each restart is a new name.

SIGTERM/SIGINT: stop reading, finish the jobs in hand, leave the heartbeats, exit. A SIGKILLed (or stopped)
worker's jobs are claimed by the others once their keep-alive stops. Metrics:
``MSFLOW_WORKER_METRICS_PORT`` (Prometheus).
"""

from service.worker.consumer import Worker
from service.worker.failures import JobFailed
from service.worker.main import run_worker

__all__ = ["JobFailed", "Worker", "run_worker"]
