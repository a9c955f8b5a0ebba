"""Multi-process metric values: no system call per update, and a fork still noticed.

prometheus-client, in multi-process mode, asks for the process id on every value update (to
notice a fork and reopen its per-process files); ``service.metrics_multiprocess`` hands it an id read once
and refreshed by a fork hook. Each case runs in a fresh interpreter, since the value class
is chosen when prometheus-client is imported, from ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Counts every call of os.getpid (a builtin: the profiler sees it as a "c_call") while a
# front end's per-request metrics are updated 500 times; prints the count as JSON.
_COUNT_GETPID = """
import json, os, sys
from prometheus_client import values
import service.metrics as m
if sys.argv[1] == "library-default":
    values.ValueClass = values.MultiProcessValue()
metrics = m.ServiceMetrics()
calls = 0
def profile(frame, event, arg):
    global calls
    if event == "c_call" and arg is os.getpid:
        calls += 1
sys.setprofile(profile)
for _ in range(500):
    metrics.observe_request("/v1/inspect/{category}", "brick", 200, 0.002)
    metrics.count_image("brick", False, "ok")
    metrics.observe_score("brick", 0.1)
    metrics.observe_stage("decode", 0.0005)
sys.setprofile(None)
print(json.dumps({"getpid": calls}))
"""

# Updates a counter in this process, forks, updates it in the child, and prints both pids:
# each process's values must land in a file of its own.
_FORK = """
import json, os
import service.metrics as m
from service.metrics_multiprocess import current_process_id
metrics = m.ServiceMetrics()
metrics.count_image("brick", False, "ok")
child = os.fork()
if child == 0:
    metrics.count_image("brick", True, "ng")
    os._exit(0 if current_process_id() == os.getpid() else 3)
_, status = os.waitpid(child, 0)
print(json.dumps({"parent": os.getpid(), "child": child, "status": status}))
"""


def _run(code: str, metrics_dir: Path, *args: str) -> dict[str, int]:
    metrics_dir.mkdir(exist_ok=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_metric_updates_ask_the_kernel_for_no_process_id(tmp_path: Path) -> None:
    ours = _run(_COUNT_GETPID, tmp_path / "ours", "service")
    assert ours["getpid"] == 0
    # The library's own class, on the same updates: a getpid per value written.
    library = _run(_COUNT_GETPID, tmp_path / "library", "library-default")
    assert library["getpid"] >= 500 * 7


def test_a_forked_child_writes_its_values_to_files_of_its_own(tmp_path: Path) -> None:
    result = _run(_FORK, tmp_path)
    assert result["status"] == 0, "the child's process id was not refreshed after the fork"
    files = {p.name for p in tmp_path.iterdir()}
    assert f"counter_{result['parent']}.db" in files
    assert f"counter_{result['child']}.db" in files
