"""The TensorRT engine cache's byte budget (service/engines/ort_cache.py), on real files and
real ``flock``s held by another process.

Every exported or recalibrated version is a new sha256 and a new engine folder; before the
budget nothing removed the old ones, and on Kubernetes the cache lives in /tmp's emptyDir
(``sizeLimit: 1Gi``), past which the kubelet evicts the pod.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.engines.ort_cache import (
    IN_USE_LOCK,
    LAST_USED,
    RESERVED,
    cache_bytes,
    disk_bytes,
    hold_model_folder,
    model_folders,
    prune,
    remove_if_unused,
    reserve_engine_cache,
)

ROOT = Path(__file__).resolve().parents[2]
KiB = 1024
ENGINE = "TensorrtExecutionProvider_TRTKernel_graph_main_0_0_fp16_sm90.engine"
TIMING = "TensorrtExecutionProvider_cache_sm90.timing"


def sha(n: int) -> str:
    return hashlib.sha256(f"version {n}".encode()).hexdigest()


def make_model(root: Path, model: str, nbytes: int, last_used: float) -> Path:
    """A model folder as the provider leaves it: an engine, and the marker of its last use."""
    folder = root / model
    folder.mkdir(parents=True, mode=0o700)
    (folder / ENGINE).write_bytes(os.urandom(nbytes))
    (folder / LAST_USED).touch()
    os.utime(folder / LAST_USED, (last_used, last_used))
    return folder


HOLDER = ("import sys; from pathlib import Path; from service.engines.ort_cache import hold_model_folder; "
          "hold = hold_model_folder(Path(sys.argv[1]), sys.argv[2]); print('held', flush=True); sys.stdin.read()")


@contextmanager
def held_by_another_process(root: Path, model: str) -> Iterator[None]:
    """Another server process holding ``model``'s folder (loading or serving it), until the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), model], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.fixture
def four_models(tmp_path: Path) -> tuple[Path, list[str], int]:
    """A cache of four models, last used in the order 0, 1, 2, 3 (0 the longest ago), 256 KiB each."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    models = [sha(n) for n in range(4)]
    for n, model in enumerate(models):
        make_model(root, model, 256 * KiB, last_used=1_000_000 + 1000 * n)
    return root, models, disk_bytes(root / models[0])


def test_the_least_recently_used_models_are_removed_first_and_no_more_than_needed(
        four_models: tuple[Path, list[str], int]) -> None:
    root, models, per_model = four_models
    total = cache_bytes(root)
    # Room for one and a half engines more than the cache holds: two folders must go, the oldest.
    outcome = prune(root, max_bytes=total, headroom=per_model + per_model // 2)
    assert outcome.removed == (models[0], models[1])
    assert sorted(p.name for p in root.iterdir()) == sorted(models[2:])
    assert outcome.fits and outcome.total_bytes == cache_bytes(root) <= total - per_model - per_model // 2


def test_the_order_is_the_last_use_not_the_folders_age(four_models: tuple[Path, list[str], int]) -> None:
    root, models, per_model = four_models
    hold_model_folder(root, models[0]).close()  # the oldest folder's model is used again: now the newest
    assert [f.path.name for f in model_folders(root)] == [models[1], models[2], models[3], models[0]]
    outcome = prune(root, max_bytes=cache_bytes(root), headroom=per_model)
    assert outcome.removed == (models[1],)


def test_a_folder_another_process_holds_is_kept(four_models: tuple[Path, list[str], int]) -> None:
    root, models, per_model = four_models
    with held_by_another_process(root, models[0]):
        # Loaded weeks ago and served since: its last use (the load) is still the oldest.
        os.utime(root / models[0] / LAST_USED, (1_000_000, 1_000_000))
        outcome = prune(root, max_bytes=cache_bytes(root), headroom=per_model + per_model // 2)
        assert outcome.in_use == (models[0],)
        assert outcome.removed == (models[1], models[2])  # the next least recently used instead
        assert (root / models[0] / ENGINE).is_file()
        assert outcome.fits
    # Let go (the engine unloaded, the process gone): the folder is the first to go now.
    assert remove_if_unused(root / models[0]) is not None and not (root / models[0]).exists()


def test_a_folder_this_process_holds_is_kept_too(four_models: tuple[Path, list[str], int]) -> None:
    """flock locks are per open file: the engine process's own models are kept from its own pruning."""
    root, models, per_model = four_models
    hold = hold_model_folder(root, models[0])
    try:
        assert remove_if_unused(root / models[0]) is None
        assert (root / models[0] / ENGINE).is_file()
    finally:
        hold.close()
    assert remove_if_unused(root / models[0]) is not None


def test_the_timing_cache_and_other_files_of_the_root_are_never_removed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / TIMING).write_bytes(os.urandom(512 * KiB))
    make_model(root, sha(0), 64 * KiB, last_used=1_000_000)
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "x").write_bytes(os.urandom(64 * KiB))
    # A budget under what the timing cache alone takes: every model goes, nothing else, and it does not fit.
    outcome = prune(root, max_bytes=256 * KiB, headroom=0)
    assert outcome.removed == (sha(0),) and not outcome.fits
    assert (root / TIMING).stat().st_size == 512 * KiB and (root / "not-a-model" / "x").is_file()
    assert outcome.total_bytes >= 512 * KiB  # the timing cache counts


def test_links_are_neither_followed_nor_removed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ENGINE).write_bytes(os.urandom(256 * KiB))
    (root / sha(9)).symlink_to(elsewhere)
    outcome = prune(root, max_bytes=1, headroom=0)
    assert outcome.removed == () and (elsewhere / ENGINE).is_file() and (root / sha(9)).is_symlink()
    assert cache_bytes(root) < 256 * KiB  # its target is not counted either


def test_recalibrations_without_end_stay_within_the_budget(tmp_path: Path) -> None:
    """The defect: each new version added an engine and none left. Twelve versions of 256 KiB
    engines under a 1 MiB budget: the cache never exceeds it, and the newest versions stay."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    budget = 1024 * KiB
    engine_bytes = 256 * KiB
    onnx_bytes = 200 * KiB
    serving = None
    for n in range(12):
        hold = reserve_engine_cache(root, sha(n), budget, onnx_bytes)
        assert hold is not None, f"version {n} found no room"
        assert cache_bytes(root) <= budget  # its reservation included, before a byte of the engine is written
        (root / sha(n) / ENGINE).write_bytes(os.urandom(engine_bytes))  # the provider writes the engine
        hold.release_reservation()
        assert cache_bytes(root) <= budget
        if serving is not None:
            serving.close()  # the server swaps to the new version and lets the old one go
        serving = hold
    assert serving is not None
    kept = {f.path.name for f in model_folders(root)}
    assert sha(11) in kept and sha(10) in kept and sha(0) not in kept
    assert len(kept) * engine_bytes <= budget


def test_engines_reserved_at_once_share_the_budget(tmp_path: Path) -> None:
    """Categories loaded together build at once: each build's reservation counts before its
    engine is written, so the second is refused room the first already took."""
    root = tmp_path / "cache"
    root.mkdir()
    first = reserve_engine_cache(root, sha(0), max_bytes=600 * KiB, onnx_bytes=400 * KiB)
    assert first is not None and int((root / sha(0) / RESERVED).read_text()) == 400 * KiB
    assert reserve_engine_cache(root, sha(1), max_bytes=600 * KiB, onnx_bytes=400 * KiB) is None
    assert remove_if_unused(root / sha(1)) is not None  # the refused model holds nothing
    first.close()
    assert not (root / sha(0) / RESERVED).exists()


def test_a_model_the_budget_cannot_hold_is_refused_while_others_serve(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    make_model(root, sha(0), 512 * KiB, last_used=1_000_000)
    with held_by_another_process(root, sha(0)):
        assert reserve_engine_cache(root, sha(1), max_bytes=768 * KiB, onnx_bytes=64 * KiB) is None
        assert (root / sha(0) / ENGINE).is_file()  # served elsewhere: never removed for room
    hold = reserve_engine_cache(root, sha(1), max_bytes=768 * KiB, onnx_bytes=64 * KiB)
    assert hold is not None and not (root / sha(0)).exists()  # let go: removed for the new model
    hold.close()


def test_a_folder_removed_meanwhile_does_not_crash(four_models: tuple[Path, list[str], int]) -> None:
    root, models, per_model = four_models
    listed = model_folders(root)
    shutil.rmtree(listed[0].path)  # another process pruned it between the listing and the removal
    assert remove_if_unused(listed[0].path) == 0
    outcome = prune(root, max_bytes=cache_bytes(root), headroom=per_model)
    assert outcome.removed == (models[1],) and outcome.fits


def test_a_holder_waiting_on_a_folder_being_removed_makes_it_again(tmp_path: Path) -> None:
    """A process taking a model's folder while a pruner removes it must not hold the removed
    folder's lock (its engine would be written nowhere): it makes the folder again."""
    import fcntl

    root = tmp_path / "cache"
    folder = make_model(root, sha(0), 64 * KiB, last_used=1_000_000)
    lock_path = folder / IN_USE_LOCK
    pruner = os.open(lock_path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(pruner, fcntl.LOCK_EX)  # the pruner, mid-removal
    holds = []
    holder = threading.Thread(target=lambda: holds.append(hold_model_folder(root, sha(0))))
    holder.start()

    def opened_by_both() -> bool:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(lock_path)) >= 2

    for _ in range(500):  # until the holder has the old lock file open and waits on it
        if opened_by_both():
            break
        threading.Event().wait(0.01)
    assert opened_by_both()
    shutil.rmtree(folder)
    os.close(pruner)
    holder.join(timeout=10)
    hold = holds[0]
    assert folder.is_dir() and (folder / LAST_USED).is_file()
    assert remove_if_unused(folder) is None  # held: the new folder's lock, not the removed one's
    hold.close()


def test_the_folders_it_makes_are_private(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    hold = reserve_engine_cache(root, sha(0), max_bytes=1024 * KiB, onnx_bytes=64 * KiB)
    assert hold is not None
    assert stat.S_IMODE((root / sha(0)).stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((root / sha(0) / IN_USE_LOCK).stat().st_mode) & 0o077 == 0
    hold.close()
