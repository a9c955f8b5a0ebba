"""Ctrl-C on an `msflow` command ends it as a stopped command, not as a crash.

Found by following the README: Ctrl-C on ./scripts/demo.sh shut `msflow serve` down
gracefully, then uvicorn re-raised the SIGINT it had caught and the command ended in a
KeyboardInterrupt traceback (about 30 lines) that reads like a crash.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.harness import Server


def test_ctrl_c_on_msflow_serve_ends_without_a_traceback(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()  # an empty store serves (/healthz) as the demo's does before its first model
    server = Server(store, tmp_path / "serve.log")
    try:
        server.wait_alive()
        server.proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground
        status = server.proc.wait(30)
        log = server.log()
        assert "Traceback" not in log, log
        assert "msflow serve: interrupted" in log, log
        # as Python ends on an uncaught Ctrl-C: killed by SIGINT, so a calling shell script stops too
        assert status == -signal.SIGINT, (status, log)
    finally:
        server.stop()
