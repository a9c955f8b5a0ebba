"""A version folder that failed to load while it was still being copied into the store (rsync,
``cp -r``: not the exporter, which renames a complete folder into place) is loaded by the watch
once the copy is complete. Before, its failure was kept for good: rsync lands ``manifest.json``
before ``model.onnx`` (it copies in name order), a scan in between found a version with a
manifest whose model was missing, and the watch never tried it again (the line stayed on the
version before, ``msflow_model_versions_failed`` at 1 and ``GET /v1/models`` saying the file
was missing, until an operator's reload). A version that failed and has not changed since is
still not tried again."""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path
from typing import Any

from harness import CATEGORY, fake_version
from models.manifest import Manifest, file_entry
from service.config import Settings
from service.engines.null import NullEngine
from service.pipeline.registry import ModelRegistry


def _exported(src: Path, version: str, model: bytes = b"weights" * 1000) -> Path:
    """A complete version folder outside the store: a manifest listing its model file."""
    folder = fake_version(src, CATEGORY, version)
    (folder / "model.onnx").write_bytes(model)
    manifest = Manifest.read(folder)
    manifest.model_copy(update={"files": {"model.onnx": file_entry(folder / "model.onnx")}}).write(folder)
    return folder


def _registry(store: Path, failures: list[str]) -> ModelRegistry:
    """A registry whose engine checks the model file against the manifest, as the ONNX and
    TensorRT engines do (sizes and sha256s, before loading)."""
    def factory(version_dir: Path, **_: Any) -> NullEngine:
        Manifest.read(version_dir).verify_files(version_dir)
        return NullEngine(version_dir, max_batch_size=2)

    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1), engine_factory=factory)
    registry.on_load_failure = failures.append
    return registry


def _rsync_manifest_first(src: Path, dst: Path) -> None:
    """What rsync has done of ``src`` -> ``dst`` when it has copied ``manifest.json`` and not
    yet ``model.onnx`` (its temporary file is a dot file, which nothing reads)."""
    dst.mkdir()
    shutil.copy2(src / "manifest.json", dst / "manifest.json")
    (dst / ".model.onnx.Xa9fQ2").write_bytes((src / "model.onnx").read_bytes()[:100])


def _rsync_rest(src: Path, dst: Path) -> None:
    (dst / ".model.onnx.Xa9fQ2").unlink()
    shutil.copy2(src / "model.onnx", dst / "model.onnx")


def test_a_new_version_caught_half_copied_is_served_once_the_copy_is_complete(tmp_path: Path) -> None:
    store, failures = tmp_path / "store", []
    shutil.copytree(_exported(tmp_path / "src", "1"), store / CATEGORY / "1")
    v2 = _exported(tmp_path / "src", "2")
    registry = _registry(store, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        _rsync_manifest_first(v2, store / CATEGORY / "2")
        assert await registry.refresh() == [] and failures == [CATEGORY]
        assert "missing" in registry.failed_versions(CATEGORY)["2"]
        assert await registry.refresh() == [] and failures == [CATEGORY]  # unchanged: not tried again
        _rsync_rest(v2, store / CATEGORY / "2")
        assert await registry.refresh() == [CATEGORY]
        assert registry.serving() == {CATEGORY: "2"} and registry.failed_versions(CATEGORY) == {}
        assert failures == [CATEGORY]

    asyncio.run(main())


def test_a_new_category_caught_half_copied_serves_once_the_copy_is_complete(tmp_path: Path) -> None:
    store, failures = tmp_path / "store", []
    fake_version(store, "tile", "1")
    v1 = _exported(tmp_path / "src", "1")
    registry = _registry(store, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        (store / CATEGORY).mkdir()
        _rsync_manifest_first(v1, store / CATEGORY / "1")
        await registry.refresh()
        assert registry.status() == {CATEGORY: "failed", "tile": "serving 1"}
        _rsync_rest(v1, store / CATEGORY / "1")
        assert await registry.refresh() == [CATEGORY]
        assert registry.status() == {CATEGORY: "serving 1", "tile": "serving 1"} and registry.failed == {}

    asyncio.run(main())


def test_a_broken_version_exported_again_under_its_number_is_served(tmp_path: Path) -> None:
    """A broken export removed and exported again: the exporter numbers it as the one removed."""
    store, failures = tmp_path / "store", []
    shutil.copytree(_exported(tmp_path / "src", "1"), store / CATEGORY / "1")
    broken = _exported(tmp_path / "broken", "2")
    (broken / "model.onnx").write_bytes(b"corrupt" * 1000)  # same size, other bytes: the sha256 differs
    registry = _registry(store, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        shutil.copytree(broken, store / CATEGORY / ".2-staging")
        (store / CATEGORY / ".2-staging").rename(store / CATEGORY / "2")
        assert await registry.refresh() == [] and "sha256" in registry.failed_versions(CATEGORY)["2"]
        assert await registry.refresh() == [] and failures == [CATEGORY]
        shutil.rmtree(store / CATEGORY / "2")
        shutil.copytree(_exported(tmp_path / "fixed", "2"), store / CATEGORY / ".2-staging")
        (store / CATEGORY / ".2-staging").rename(store / CATEGORY / "2")
        assert await registry.refresh() == [CATEGORY] and registry.serving() == {CATEGORY: "2"}

    asyncio.run(main())


def test_a_version_that_failed_unreadable_is_served_once_its_permissions_are_fixed(tmp_path: Path) -> None:
    """Copied by root with umask 077 (``sudo rsync``, ``cp`` from a home folder), a model the
    service's user (uid 10001 in the image) may not read fails with "Permission denied"; the
    operator's ``chmod a+r`` changes no name, inode, size or mtime, only the file's ctime.
    Before, the watch kept skipping it as unchanged until an operator's reload."""
    store, failures = tmp_path / "store", []
    shutil.copytree(_exported(tmp_path / "src", "1"), store / CATEGORY / "1")

    def as_the_service_user(version_dir: Path, **_: Any) -> NullEngine:
        # This test may run as root, who reads anything: the service's user is not the owner.
        if not (version_dir / "model.onnx").stat().st_mode & stat.S_IROTH:
            raise PermissionError(13, "Permission denied", str(version_dir / "model.onnx"))
        Manifest.read(version_dir).verify_files(version_dir)
        return NullEngine(version_dir, max_batch_size=2)

    registry = ModelRegistry(Settings(model_store=store, engine="null", store_poll_s=1),
                             engine_factory=as_the_service_user)
    registry.on_load_failure = failures.append

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        v2 = shutil.copytree(_exported(tmp_path / "src", "2"), store / CATEGORY / ".2-staging")
        (v2 / "model.onnx").chmod(0o600)
        v2.rename(store / CATEGORY / "2")
        assert await registry.refresh() == [] and "Permission denied" in registry.failed_versions(CATEGORY)["2"]
        assert await registry.refresh() == [] and failures == [CATEGORY]  # unchanged: not tried again
        (store / CATEGORY / "2" / "model.onnx").chmod(0o644)
        assert await registry.refresh() == [CATEGORY] and registry.serving() == {CATEGORY: "2"}
        assert failures == [CATEGORY]

    asyncio.run(main())


def test_the_record_of_a_failed_version_goes_with_its_folder(tmp_path: Path) -> None:
    """Each scan reads the folder of every failed version it still records: a version removed
    from the store is forgotten, not read again at every scan for the life of the server (an
    export pipeline that leaves a broken version now and then, removed later, added one each)."""
    store, failures = tmp_path / "store", []
    shutil.copytree(_exported(tmp_path / "src", "1"), store / CATEGORY / "1")
    registry = _registry(store, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        for version in ("2", "3"):
            _rsync_manifest_first(_exported(tmp_path / "src", version), store / CATEGORY / version)
        assert await registry.refresh() == [] and set(registry.failed_versions(CATEGORY)) == {"2", "3"}
        shutil.rmtree(store / CATEGORY / "2")
        await registry.refresh()
        assert set(registry._failed_versions[CATEGORY]) == {"3"}  # what the scans read

    asyncio.run(main())


def test_a_served_version_replaced_half_copied_serves_on_until_the_copy_is_complete(tmp_path: Path) -> None:
    """The served version's folder replaced by a copy (another model under the same number),
    caught with its manifest and no model yet: the version loaded before serves on, the failure
    is counted once and shown, and the complete copy is served at the scan after it lands."""
    store, failures = tmp_path / "store", []
    shutil.copytree(_exported(tmp_path / "src", "1"), store / CATEGORY / "1")
    other = _exported(tmp_path / "other", "1", model=b"retrained" * 1000)
    registry = _registry(store, failures)

    async def main() -> None:
        registry.discover()
        await registry.load_all()
        first = registry.get(CATEGORY)
        shutil.rmtree(store / CATEGORY / "1")
        _rsync_manifest_first(other, store / CATEGORY / "1")
        for _ in range(3):  # counted once, not at every scan
            assert await registry.refresh() == [] and failures == [CATEGORY]
        assert registry.get(CATEGORY) is first and "missing" in registry.failed_versions(CATEGORY)["1"]
        _rsync_rest(other, store / CATEGORY / "1")
        assert await registry.refresh() == [CATEGORY]
        assert registry.get(CATEGORY).manifest == Manifest.read(other) and registry.failed_versions(CATEGORY) == {}
        assert await registry.refresh() == [] and failures == [CATEGORY]

    asyncio.run(main())
