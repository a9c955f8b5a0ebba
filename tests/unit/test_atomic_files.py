"""models/atomic_files.py: the one way a file is replaced whole (run files, store files,
thresholds, labels, plans)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from models.atomic_files import write_atomic


def test_bytes_text_and_writer_functions_replace_the_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    write_atomic(target, "new text")
    assert target.read_text() == "new text"
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_atomic(target, lambda f: f.write(memoryview(b"plan")), durable=True)
    assert target.read_bytes() == b"plan"
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good weights")

    def dies_half_way(f) -> None:
        f.write(b"half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, dies_half_way)
    assert target.read_bytes() == b"good weights"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_writers_of_one_path_at_once_never_share_a_temporary_file(tmp_path: Path) -> None:
    """Two exports, replicas or threads writing one file: each rename carries one whole
    writer's contents (a shared ``<name>.tmp`` interleaved them or lost a rename)."""
    target = tmp_path / "status.json"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors: list[BaseException] = []

    def write(payload: bytes) -> None:
        try:
            for _ in range(20):
                write_atomic(target, payload)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["status.json"]


def test_the_file_gets_the_mode_open_would_give_it(tmp_path: Path) -> None:
    """0666 less the umask, as ``open`` creates a file: world-readable under the usual 022
    (a server of another user reads the store), private under 077."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a", "x")
        os.umask(0o077)
        write_atomic(tmp_path / "b", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600


def test_a_named_temporary_file_is_used_for_sweepers(tmp_path: Path) -> None:
    seen: list[list[str]] = []
    write_atomic(tmp_path / "x.json", lambda f: seen.append(sorted(os.listdir(tmp_path))), temp=".x.abc.partial")
    assert seen == [[".x.abc.partial"]]
    assert os.listdir(tmp_path) == ["x.json"]
