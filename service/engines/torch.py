"""The PyTorch engine: the model of the version's source run, run eagerly. The reference.

It needs the training run the version was exported from (``manifest.source_run``): the
model store itself holds only the ONNX graph and the plan. On CUDA it can run under FP16
autocast and replay CUDA graphs, one per batch size, captured lazily at the first batch of
that size with static input/output buffers; both exist so the GPU check can measure what
they buy against TensorRT.

The run's ``checkpoint.pt`` must be the one exported: the manifest records its sha256
(``source_checkpoint_sha256``), and a run retrained or resumed in place since is refused. Its
model settings must be the manifest's but for ``map_sigma`` (the served map's smoothing,
which ``msflow export --map-sigma`` may change): the version's value is applied.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest
from service.engines.base import MAP_OUTPUT, EngineError, check_batch

GRAPH_WARMUP_RUNS = 3

log = logging.getLogger(__name__)


def _resolve_device(device: str) -> Any:
    from models.devices import DeviceError, torch_device

    try:
        return torch_device(device)
    except DeviceError as exc:
        raise EngineError(str(exc)) from exc


def check_source_checkpoint(manifest: Manifest, version_dir: Path, run: str) -> None:
    """EngineError unless ``run``'s checkpoint is the one ``version_dir`` was exported from.
    The config alone cannot tell: a run retrained or resumed in place keeps its config, and
    its new weights would give other scores than the version's graph, under its calibration."""
    from models.runs import RunError, checkpoint_sha256

    expected = manifest.source_checkpoint_sha256
    if expected is None:
        log.warning("%s records no checkpoint sha256 (exported before it was recorded): the torch engine cannot "
                    "check that run %s still holds the exported weights; re-export to record it", version_dir, run)
        return
    try:
        actual = checkpoint_sha256(run)
    except RunError as e:
        raise EngineError(f"cannot check the checkpoint of run {run}: {e}") from e
    if actual != expected:
        raise EngineError(f"run {run} now holds another checkpoint than {version_dir} was exported from (sha256 "
                          f"{actual[:12]}..., the manifest says {expected[:12]}...): it was retrained or resumed in "
                          "place since. Re-export the run, or serve the version's exported graph (engine onnx)")


class TorchEngine:
    """``MSFlow`` of ``manifest.source_run`` on ``device`` (``auto``: CUDA, then CPU)."""

    def __init__(self, version_dir: str | Path, device: str = "auto", manifest: Manifest | None = None,
                 max_batch_size: int = 64, half: bool = False, cuda_graphs: bool = False) -> None:
        import torch

        from models.msflow import MSFlowConfig
        from models.runs import load_model

        self.version_dir = Path(version_dir)
        self.manifest = manifest or Manifest.read(self.version_dir)
        self.device = _resolve_device(device)
        if (half or cuda_graphs) and self.device.type != "cuda":
            raise EngineError("fp16 autocast and CUDA graphs need a CUDA device")
        run = self.manifest.source_run
        if not run or not Path(run).is_dir():
            relative = bool(run) and not Path(run).is_absolute()
            raise EngineError(f"the source run of {self.version_dir} ({run}) is gone; the torch engine needs the "
                              "training run (the model store holds only the exported graph)"
                              + ("; the path is relative (exported before paths were stored absolute): re-export "
                                 "the run" if relative else ""))
        try:
            model, _ = load_model(run, self.device)
        except Exception as e:  # RunError, a corrupt checkpoint, missing backbone weights
            raise EngineError(f"cannot load the model of run {run}: {e}") from e
        # Hashed after the load (the export hashes before it): a checkpoint replaced in
        # between is then a refusal, never a pass.
        check_source_checkpoint(self.manifest, self.version_dir, run)
        try:
            expected = MSFlowConfig.model_validate(self.manifest.model)
        except ValueError as e:
            raise EngineError(f"{self.version_dir}: the manifest's model settings are not valid: {e}") from e
        # map_sigma is the served map's smoothing, post-processing only: export may set it
        # (--map-sigma) without changing the run, so the version's value is applied here.
        if model.config.model_copy(update={"map_sigma": expected.map_sigma}) != expected:
            raise EngineError(f"run {run} now holds a {model.config} model, but {self.version_dir} was exported "
                              f"from a {expected} one")
        model.set_map_sigma(expected.map_sigma)
        self.model = model.eval()
        self.half = half
        self.cuda_graphs = cuda_graphs
        self.max_batch_size = max_batch_size
        self.size = self.manifest.input_size
        self.score_output = self.manifest.calibration.score_output
        self.name = f"torch-{self.device.type}" + ("-fp16" if half else "") + ("+cudagraphs" if cuda_graphs else "")
        self._graphs: dict[int, tuple[Any, Any, tuple[Any, Any]]] = {}
        self._lock = threading.Lock()
        self._torch = torch

    def _forward(self, x: Any) -> tuple[Any, Any]:
        torch = self._torch
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture.
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.half, cache_enabled=False):
            out = self.model(x, paper_maps=False)
        return out[self.score_output].float(), out[MAP_OUTPUT].float()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        batch = check_batch(images, self.size, self.max_batch_size)
        if not batch.flags.writeable:
            batch = batch.copy()
        x = torch.from_numpy(batch)
        with self._lock:
            if self.cuda_graphs:
                scores, maps = self._replay(x)
            else:
                with torch.inference_mode():
                    scores, maps = self._forward(x.to(self.device))
            return (scores.cpu().numpy().astype(np.float32, copy=False),
                    maps.cpu().numpy().astype(np.float32, copy=False))

    def _replay(self, x: Any) -> tuple[Any, Any]:
        n = x.shape[0]
        if n not in self._graphs:
            self._graphs[n] = self._capture(x)
        graph, static_in, static_out = self._graphs[n]
        static_in.copy_(x, non_blocking=False)
        graph.replay()
        return static_out

    def _capture(self, x: Any) -> tuple[Any, Any, tuple[Any, Any]]:
        torch = self._torch
        static_in = x.to(self.device).clone()
        with torch.no_grad():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                for _ in range(GRAPH_WARMUP_RUNS):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Captured on the warm-up stream, which is on this engine's device. Without
            # ``stream`` torch.cuda.graph captures on a class-wide stream made on whichever
            # device was current at the first capture (device 0 in the batcher's thread), so
            # the kernels of a cuda:1 model would launch outside the capture.
            with torch.cuda.graph(graph, stream=side):
                static_out = self._forward(static_in)
        return graph, static_in, static_out
