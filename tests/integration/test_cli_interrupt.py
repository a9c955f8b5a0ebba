"""Ctrl-C on an `msflow` command ends it as a stopped command, not as a crash.

Found by following the README: Ctrl-C on ./scripts/demo.sh shut `msflow serve` down
gracefully, then uvicorn re-raised the SIGINT it had caught and the command ended in a
KeyboardInterrupt traceback (about 30 lines) that reads like a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Server, children


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "front-ends"])
def test_ctrl_c_on_msflow_serve_ends_without_a_traceback(tmp_path: Path, processes: int) -> None:
    """With front ends too: their supervisor ended 0 on Ctrl-C, without a word, so a script
    that ran ``msflow serve`` went on as if the server had finished its work."""
    store = tmp_path / "store"
    store.mkdir()  # an empty store serves (/healthz) as the demo's does before its first model
    server = Server(store, tmp_path / "serve.log",
                    **({"api_processes": processes, "engine": "null"} if processes > 1 else {}))
    try:
        server.wait_alive()
        # what a terminal's Ctrl-C sends: SIGINT to every process of the foreground group
        for pid in [server.proc.pid, *children(server.proc.pid)]:
            os.kill(pid, signal.SIGINT)
        status = server.proc.wait(30)
        log = server.log()
        assert "Traceback" not in log, log
        assert "msflow serve: interrupted" in log, log
        # as Python ends on an uncaught Ctrl-C: killed by SIGINT, so a calling shell script stops too
        assert status == -signal.SIGINT, (status, log)
    finally:
        server.stop()


# A command that has printed results to a file or pipe (block-buffered stdout) and registered
# an exit hook, then waits: Ctrl-C must not lose either. The handler stands in for one whose
# output comes before its wait (bench's per-engine lines); main() and the exit are msflow's.
_PRINTS_THEN_WAITS = """
import atexit, sys, time
from pathlib import Path
import msflow.cli as cli

def prints_then_waits(args):
    for i in range(3):
        print(f"result {i}")
    atexit.register(lambda: Path(sys.argv[1]).write_text("ran"))
    print("ready", file=sys.stderr, flush=True)
    time.sleep(60)

cli._eval = prints_then_waits
sys.exit(cli.main(["eval", "--run", "unused"]))
"""


def test_ctrl_c_keeps_what_the_command_printed_and_runs_its_exit_hooks(tmp_path: Path) -> None:
    hook = tmp_path / "atexit.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    proc = subprocess.Popen([sys.executable, "-c", _PRINTS_THEN_WAITS, str(hook)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.splitlines() == ["result 0", "result 1", "result 2"], (out, err)
    assert hook.read_text() == "ran", err
    assert "Traceback" not in err and "msflow eval: interrupted" in err, err
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)
