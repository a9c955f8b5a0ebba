"""The benchmark-only engine: well-formed zero outputs at negligible cost.

In the manner of Triton's identity models for ``perf_analyzer``: with the engine's own cost
removed, what a front-end benchmark measures is everything around it (HTTP, multipart,
decode, batching, postprocess, JSON). It is loaded only when asked for by name
(``MSFLOW_ENGINE=null`` / ``--engine null``), never by ``auto``; every answer it gives is
"normal" with a flat map, so it must never serve a line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.manifest import Manifest
from service.engines.base import check_batch


class NullEngine:
    name = "null"

    def __init__(self, version_dir: str | Path, manifest: Manifest | None = None, max_batch_size: int = 64) -> None:
        self.manifest = manifest or Manifest.read(Path(version_dir))
        self.size = self.manifest.input_size
        self.max_batch_size = max_batch_size
        # One read-only block of zeros, sliced per batch: no allocation per call. Written once:
        # np.zeros maps fresh pages that all read from the kernel's one zero page until
        # written, cheaper to read than the memory a real engine writes its maps into, which
        # flattered one process against the engine process, whose slots are written memory
        # (0.05-0.1 ms of ~1.2 per image: docs/performance-log.md, "A tenth box").
        self._maps = np.zeros((max_batch_size, self.size, self.size), dtype=np.float32)
        self._maps.fill(0.0)
        self._maps.flags.writeable = False
        self._scores = np.zeros(max_batch_size, dtype=np.float32)
        self._scores.flags.writeable = False

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(images, self.size, self.max_batch_size)
        return self._scores[: len(batch)], self._maps[: len(batch)]
