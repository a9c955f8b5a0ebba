"""Several processes, one ``/metrics`` (``MSFLOW_API_PROCESSES`` > 1): how the values of every
process of a server are kept and added up. The metrics themselves are :mod:`service.metrics`.

The supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` for its front ends and engine process, so
prometheus-client keeps every value in per-process files there, and any front end's
``/metrics`` adds them up (counters and histograms summed; each gauge says how:
``multiprocess_mode``, which a single process ignores). The engine process's batch metrics
thus appear on every front end. Each process keeps its values in memory and writes them to
its files once a second and before every exposition (:mod:`service.metrics_buffer`, installed
here as prometheus-client's value class when this module is imported, before any metric is
made).

A series that retires (``msflow_model_info`` of a version no longer served) is removed in
one process; a multi-process file cannot drop a label set, and kept it at 0 for the life of
the process (``{version="1"} 0`` beside ``{version="2"} 1`` after every reload), so the
merged ``/metrics`` leaves out an info gauge's series at 0 (:func:`merged_view`).

A share over a window (``msflow_anomaly_rate``) cannot be merged from each process's share:
each front end writes its window's anomalous verdicts and images instead (hidden gauges,
summed over the live processes, :data:`RATE_PARTS`), and the merged ``/metrics`` writes the
rate as their ratio. Taking the share of whichever process wrote last (``livemostrecent``)
showed one front end's window, 0.514 against 0.554 for the whole server in one run.
"""

from __future__ import annotations

import glob
import os
import time
import warnings
from collections.abc import Iterator

from prometheus_client import values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from service import metrics_buffer

# In multi-process mode prometheus-client warns at each remove() that removal "has not been
# implemented": the files keep a removed series' last value, which the callers of remove
# zero first. The warning went to the log at every version swap of a multi-process server, and
# read as a broken swap. Set once here, not per call: catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", message="Removal of labels has not been implemented", category=UserWarning)

_process_id = os.getpid()


def _forked() -> None:
    global _process_id
    _process_id = os.getpid()


def current_process_id() -> int:
    """This process's id, read from the kernel once and again only after a fork."""
    return _process_id


os.register_at_fork(after_in_child=_forked)
if values.ValueClass is not values.MutexValue:
    # Multi-process mode (PROMETHEUS_MULTIPROC_DIR, set by the supervisor before it spawns
    # the front ends and the engine process): prometheus-client writes every update through
    # to its file, under a lock, after asking for the process id (a getpid system call each,
    # ~13 of a front end's 22 per request before: strace, docs/performance-log.md). Values
    # are kept in memory instead and written in one go (service/metrics_buffer.py); with a
    # prometheus-client it does not know, the library's own value, asking this module for the
    # process id (the fork hook keeps it true) instead of the kernel.
    if not metrics_buffer.install():
        values.ValueClass = values.MultiProcessValue(process_identifier=current_process_id)

# Gauges whose series are 1 while what they describe exists and retired at 0 (set_model):
# a series at 0 is not exported.
INFO_GAUGES = frozenset({"msflow_model_info"})
# The anomaly rate's parts in multi-process mode: never exported, read to write the rate.
RATE_PARTS = ("msflow_anomaly_window_anomalous", "msflow_anomaly_window_images")
RATE_HELP = "Share of anomalous verdicts among the last MSFLOW_ANOMALY_RATE_WINDOW images"


def multiprocess() -> bool:
    """Whether this process writes its values to the files every front end reads."""
    return values.ValueClass is not values.MutexValue


def merged_view(pause_s: float = 0.0) -> Collector:
    """What the ``/metrics`` body of the whole server is made of: this process's values written
    out now, every process's files read as it is collected (the other processes flushed when
    asked: api/health.py). ``pause_s``: a pause after each file read (:func:`_merged`)."""
    metrics_buffer.flush()
    return _MultiProcessView(pause_s)


# prometheus-client's merge in its two steps (its internals, as in 0.20-0.26): without them,
# the merge is its collect(), in one piece.
_PIECEWISE = all(callable(getattr(MultiProcessCollector, step, None))
                 for step in ("_read_metrics", "_accumulate_metrics"))


def _merged(pause_s: float) -> Iterator[Metric]:
    """``MultiProcessCollector(None).collect()``, the same families in the same order, in pieces:
    one file read at a time (a pause after each), then one family added up at a time. Built in
    a thread beside the event loop, the merge in one piece (10 categories, 3 processes: ~5.5 ms
    of reading, ~2.4 ms of adding up) held the GIL, so the loop, for up to the switch interval
    (5 ms) at each turn; the largest piece is now a file (~1.8 ms)."""
    if not pause_s or not _PIECEWISE:
        yield from MultiProcessCollector(None).collect()
        return
    metrics: dict[str, Metric] = {}
    for file in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        for name, metric in MultiProcessCollector._read_metrics([file]).items():  # noqa: SLF001
            known = metrics.setdefault(name, metric)
            if known is not metric:
                known.samples.extend(metric.samples)
        time.sleep(pause_s)
    for metric in metrics.values():
        yield from MultiProcessCollector._accumulate_metrics({metric.name: metric}, True)  # noqa: SLF001


class _MultiProcessView(Collector):
    """Every process's values added up (prometheus-client's ``MultiProcessCollector``), less
    the retired series of the info gauges: a multi-process file keeps a label set once made,
    whatever ``remove`` does, so a version swapped out stayed on ``/metrics`` at 0 for as long
    as the process that served it lived, and a table of what serves listed it."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self.pause_s = pause_s

    def collect(self) -> Iterator[Metric]:
        parts: dict[str, dict[str, float]] = {name: {} for name in RATE_PARTS}
        for family in _merged(self.pause_s):
            if family.name in INFO_GAUGES:
                family.samples = [sample for sample in family.samples if sample.value != 0]
            if family.name in parts:
                for sample in family.samples:
                    parts[family.name][sample.labels["category"]] = sample.value
                continue
            yield family
        anomalous, images = (parts[name] for name in RATE_PARTS)
        rate = GaugeMetricFamily("msflow_anomaly_rate", RATE_HELP, labels=["category"])
        for category, count in sorted(images.items()):
            if count > 0:
                rate.add_metric([category], anomalous.get(category, 0.0) / count)
        if rate.samples:  # no image yet: no series, as in one process
            yield rate
