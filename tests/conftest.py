"""Shared fixtures: a small real demo data set, a briefly trained run, an exported store.

Everything is real (scikit-image photographs, ImageNet Lite0 weights, the trainer, the
ONNX exporter); only the sizes are small so the suite stays fast on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TEST_INPUT_SIZE = 128
TEST_CATEGORY = "brick"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    build_demo_dataset(root, seed=0, n_train=32, n_calibration=12, n_test_good=8, n_test_defect=8,
                       categories=(TEST_CATEGORY,))
    return root


@pytest.fixture(scope="session")
def trained_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained long enough that its latents are small (so float32 parity is meaningful)."""
    from models.msflow import MSFlowConfig
    from models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / TEST_CATEGORY
    cfg = TrainConfig(
        data=demo_root, category=TEST_CATEGORY, out=out, model=MSFlowConfig(input_size=TEST_INPUT_SIZE),
        lr=2e-3, meta_epochs=8, sub_epochs=2, warmup_meta_epochs=1, decay_milestones=(), batch_size=8,
        holdout_fraction=0.25, seed=0, device="cpu",
    )
    return train(cfg, progress=False)


@pytest.fixture(scope="session")
def model_store(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one exported version of the test category."""
    from models.export import export_run

    store = tmp_path_factory.mktemp("store")
    export_run(trained_run, store)
    return store


@pytest.fixture(scope="session")
def version_dir(model_store: Path) -> Path:
    return model_store / TEST_CATEGORY / "1"


@pytest.fixture()
def two_version_store(tmp_path: Path) -> Path:
    """A store of test-engine versions (no trained model): category ``aaa`` at versions 1 and
    2, for the tests of an operator's pin; a test adds its own further versions."""
    from harness import fake_version

    store = tmp_path / "store"
    fake_version(store, "aaa", "1")
    fake_version(store, "aaa", "2")
    return store


@pytest.fixture(scope="session")
def demo_test_images(demo_root: Path) -> dict[str, list[Path]]:
    """The demo test images of the test category, by defect type ("good" included)."""
    from models.data import MVTecCategory

    out: dict[str, list[Path]] = {}
    # Visible-tier defects first: tests that need "a hole" get the dark one, not the shallow dent.
    samples = sorted(MVTecCategory(demo_root, TEST_CATEGORY).test_samples(), key=lambda s: s.tier == "subtle")
    for s in samples:
        out.setdefault(s.defect_type, []).append(s.path)
    return out


@pytest.fixture(scope="session")
def visible_test_images(demo_root: Path) -> dict[str, list[Path]]:
    """The visible-tier defective test images by defect type (subtle ones are the model's to miss)."""
    from models.data import MVTecCategory

    out: dict[str, list[Path]] = {}
    for s in MVTecCategory(demo_root, TEST_CATEGORY).test_samples():
        if s.tier == "visible":
            out.setdefault(s.defect_type, []).append(s.path)
    return out
