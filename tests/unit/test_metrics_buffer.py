"""Multi-process metric values buffered in memory (service/metrics_buffer.py): what the files
hold after a flush is exactly what prometheus-client's write-through value leaves, and a
process's values reach its files at exit without a flush of its own. Each case runs in a fresh
interpreter, since the value class is chosen when prometheus-client is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.multiprocess import MultiProcessCollector

REPO = Path(__file__).resolve().parents[2]

# The same updates through the library's own value ("library") or ours ("service"), awkward
# floats included (sums must match to the bit), then every sample the files hold, as JSON.
# "service" also prints what the files held before the flush (the updates are not written).
_UPDATES = """
import json, sys
from prometheus_client import values
from prometheus_client.multiprocess import MultiProcessCollector
import service.metrics as m
from service import metrics_buffer
if sys.argv[1] == "library":
    values.ValueClass = values.MultiProcessValue()
metrics = m.ServiceMetrics()

def read():
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in MultiProcessCollector(None).collect() for s in family.samples}

def round(i):
    seconds = 0.0001 * (i % 17) + 1e-7 * i
    metrics.observe_request("/v1/inspect/{category}", "brick", 200 if i % 5 else 503, seconds)
    metrics.count_image("brick", i % 3 == 0, "ng" if i % 3 == 0 else "ok")
    metrics.observe_score("brick", (i % 23) / 22.0)
    metrics.observe_stage("decode", seconds / 3)
    metrics.observe_batch("brick", "onnx", 1 + i % 7, seconds * 7)
    metrics.set_queue_depth("brick", i % 11)
    metrics.set_anomaly_window("brick", i % 13, min(i + 1, 200))
    metrics.count_rejection("brick", "queue_full")

round(0)  # these two make every series
round(1)
metrics_buffer.flush()
made = read()
for i in range(2, 300):
    round(i)
before_flush = read()
metrics_buffer.flush()
print(json.dumps({"samples": read(), "before_flush": before_flush, "made": made}))
"""

# Updates a counter 100,000 times from each of four threads, exits without a flush.
_THREADS_THEN_EXIT = """
import threading
import service.metrics as m
metrics = m.ServiceMetrics()
def work():
    for _ in range(100_000):
        metrics.count_work_placement(True)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


# A category retired (its gauges zeroed and removed) and back, with no flush in between: the
# series made again must go on from what the removed one left (0), as the library's would.
_FORGOTTEN_THEN_BACK = """
import json, sys
from prometheus_client import values
from prometheus_client.multiprocess import MultiProcessCollector
import service.metrics as m
from service import metrics_buffer
if sys.argv[1] == "library":
    values.ValueClass = values.MultiProcessValue()
metrics = m.ServiceMetrics()
metrics.set_model("brick", "1", "onnx")
metrics.set_queue_depth("brick", 5)
metrics.set_anomaly_window("brick", 3, 10)
metrics_buffer.flush()
metrics.set_queue_depth("brick", 7)  # pending when the series is removed
metrics.forget_category("brick")
metrics.set_model("brick", "2", "onnx")  # back, a new version
metrics.set_anomaly_window("brick", 1, 4)
from prometheus_client import Gauge  # a gauge added to, removed with an update pending, made again
added = Gauge("test_added", "", ["k"], registry=None, multiprocess_mode="livesum")
added.labels("a").inc(5)
metrics_buffer.flush()
added.labels("a").inc(2)
added.remove("a")
added.labels("a").inc(1)
metrics_buffer.flush()
print(json.dumps({f"{s.name}{sorted(s.labels.items())}": s.value
                  for family in MultiProcessCollector(None).collect() for s in family.samples}))
"""


def _run(code: str, metrics_dir: Path, *args: str) -> str:
    metrics_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_flushed_values_are_exactly_what_write_through_gives(tmp_path: Path) -> None:
    ours = json.loads(_run(_UPDATES, tmp_path / "ours", "service").splitlines()[-1])
    library = json.loads(_run(_UPDATES, tmp_path / "library", "library").splitlines()[-1])
    assert ours["samples"] == library["samples"]  # counts, buckets, sums (to the bit), gauges
    assert ours["samples"]['msflow_images_total[(\'category\', \'brick\'), (\'label\', \'normal\')]'] == 200
    # Buffered: nothing written after the first round until the flush.
    assert ours["before_flush"] == ours["made"] != ours["samples"]
    assert library["before_flush"] == library["samples"] != library["made"]


def test_updates_from_threads_all_count_and_reach_the_files_at_exit(tmp_path: Path) -> None:
    _run(_THREADS_THEN_EXIT, tmp_path)
    total = sum(s.value for family in MultiProcessCollector(None, path=str(tmp_path)).collect()
                for s in family.samples
                if s.name == "msflow_request_work_total" and s.labels == {"where": "loop"})
    assert total == 400_000


def test_the_installed_prometheus_client_has_the_file_layer_the_buffer_writes_through() -> None:
    """BufferedValue writes through prometheus-client's internals (mmap_dict); a release that
    changed them would keep the library's own values (install() checks), so this says when the
    buffer stopped being used, rather than letting the mode grow dearer unseen."""
    from service import metrics_buffer

    assert metrics_buffer.compatible()


def test_a_series_removed_and_made_again_before_a_flush_reads_as_with_write_through(tmp_path: Path) -> None:
    ours = json.loads(_run(_FORGOTTEN_THEN_BACK, tmp_path / "ours", "service").splitlines()[-1])
    library = json.loads(_run(_FORGOTTEN_THEN_BACK, tmp_path / "library", "library").splitlines()[-1])
    assert ours == library
    assert ours["msflow_queue_depth[('category', 'brick')]"] == 0
    assert ours["test_added[('k', 'a')]"] == 8
    assert ours["msflow_model_info[('category', 'brick'), ('engine', 'onnx'), ('version', '2')]"] == 1


# 300 versions of one category served in turn (each swap removes the last one's info series),
# then how many buffered values this process still holds.
_SWAPS = """
import gc
import service.metrics as m
from service import metrics_buffer
metrics = m.ServiceMetrics()
for version in range(300):
    metrics.set_model("brick", str(version), "onnx")
metrics_buffer.flush()
gc.collect()
print(len(metrics_buffer._values))
"""


def test_a_removed_series_value_is_not_kept_for_the_process_life(tmp_path: Path) -> None:
    """Every value made was kept in a list for a fork's reopening: a series removed (a version
    no longer served, a retired category) stayed in memory for the life of the process."""
    held = int(_run(_SWAPS, tmp_path / "metrics").strip())
    made_at_start = int(_run(_SWAPS.replace("range(300)", "range(1)"), tmp_path / "metrics-1").strip())
    assert held == made_at_start, (held, made_at_start)


def test_a_swap_and_a_retirement_write_no_warning_to_the_log(tmp_path: Path) -> None:
    """prometheus-client warns "Removal of labels has not been implemented in multi-process
    mode yet" at every remove(), though the series is zeroed first and goes (above): a
    multi-process server's log said so at each version swap, and an operator took a working
    swap for a broken one."""
    code = ("import service.metrics as m\nmetrics = m.ServiceMetrics()\nmetrics.set_model('brick', '1', 'onnx')\n"
            "metrics.set_model('brick', '2', 'onnx')\nmetrics.set_anomaly_window('brick', 1, 4)\n"
            "metrics.forget_category('brick')\n")
    (tmp_path / "metrics").mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and not out.stderr, out.stderr
