"""The batcher's ``run_batch`` around an engine (:func:`service.pipeline.batcher.engine_runner`):
what reaches the engine, and what comes back per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.manifest import Manifest
from service.engines.null import NullEngine
from service.ipc.slab import Slab
from service.pipeline.batcher import engine_runner

SIZE = 32


class RecordingEngine(NullEngine):
    """The null engine, keeping each batch it was given."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(Path("."), manifest, max_batch_size=4)
        self.batches: list[np.ndarray] = []

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(images)
        return super().run(images)


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine(Manifest.model_construct(input_size=SIZE, category="test"))


def test_a_batch_of_one_reaches_the_engine_as_its_slot_not_a_copy(engine: RecordingEngine) -> None:
    # The engine process's batches are mostly of one image: its input is read where the front
    # end wrote it (a copy per image was 196 KB at 256²).
    slab = Slab.create(SIZE, 2, name="test-runner")
    try:
        slab.input(1)[...] = 7
        ((score, heat),) = engine_runner(engine)([slab.input(1)])
        (batch,) = engine.batches
        assert batch.shape == (1, SIZE, SIZE, 3)
        assert np.shares_memory(batch, slab.input(1))
        assert score == 0.0 and heat.shape == (SIZE, SIZE)
    finally:
        slab.close()


def test_a_larger_batch_is_stacked_in_order(engine: RecordingEngine) -> None:
    images = [np.full((SIZE, SIZE, 3), i, dtype=np.uint8) for i in range(3)]
    results = engine_runner(engine)(images)
    (batch,) = engine.batches
    assert batch.shape == (3, SIZE, SIZE, 3)
    assert [int(batch[i, 0, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert not any(np.shares_memory(batch, image) for image in images)
    assert len(results) == 3


def test_a_read_only_image_of_one_is_passed_as_it_is(engine: RecordingEngine) -> None:
    # One process's decoded inputs can be read-only arrays (Pillow's buffer): engines read them.
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    image.flags.writeable = False
    ((score, _),) = engine_runner(engine)([image])
    assert score == 0.0 and np.shares_memory(engine.batches[0], image)
