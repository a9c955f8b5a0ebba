"""The onnxruntime backend: :class:`OnnxEngine` over a version's ``model.onnx``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest
from service.engines.base import MAP_OUTPUT, EngineError, check_batch

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# A provider as onnxruntime takes it: its name, or (name, options) such as {"device_id": 1}.
Provider = str | tuple[str, dict[str, Any]]


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def session_options(threads: int | None = None, inter_op_threads: int | None = None,
                    optimization_level: str = "all", parallel: bool = False, spin: bool = True) -> "object":
    """onnxruntime ``SessionOptions``: intra-op threads (None: one per physical core), inter-op
    threads (only used with ``parallel``), graph optimisation level (``OPT_LEVELS``).
    ``spin=False``: intra-op threads sleep between runs instead of busy-waiting. A serving
    engine runs in bursts (a batch, then the batcher waits for the next), and spinning
    threads would take the cores decode and HTTP need meanwhile."""
    import onnxruntime as ort

    if optimization_level not in OPT_LEVELS:
        raise EngineError(f"optimization_level {optimization_level!r} is not one of {sorted(OPT_LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[optimization_level])
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if parallel:
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        if inter_op_threads:
            opts.inter_op_num_threads = inter_op_threads
    return opts


class OnnxEngine:
    """onnxruntime session over ``model.onnx``.

    On CPU the batch goes straight to ``session.run``. When the active provider is CUDA (or
    TensorRT through onnxruntime) the session runs with IO binding: the numpy batch is bound
    as a CPU input (one host-to-device copy done by onnxruntime) and only the two outputs the
    service needs are bound, on the CPU, so no unused output is copied back.

    ``cuda_device``: the CUDA device the session must run on (the operator asked for
    ``cuda:N``). onnxruntime itself falls back to the CPU, with a message on stderr only, when
    it has no CUDA provider or the provider cannot start; with ``cuda_device`` that fallback is
    an :class:`EngineError` instead.
    """

    def __init__(self, version_dir: str | Path, providers: list[Provider] | None = None, threads: int | None = None,
                 manifest: Manifest | None = None, max_batch_size: int = 64, verify: bool = True, *,
                 inter_op_threads: int | None = None, optimization_level: str = "all",
                 parallel: bool = False, io_binding: bool | None = None, spin: bool | None = None,
                 cuda_device: int | None = None) -> None:
        import onnxruntime as ort

        self.version_dir = Path(version_dir)
        self.manifest = manifest or Manifest.read(self.version_dir)
        if verify:
            self.manifest.verify_files(self.version_dir, [self.manifest.onnx.file])
        available = ort.get_available_providers()
        wanted = providers or ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if provider_name(p) in available] or ["CPUExecutionProvider"]
        # On CPU, threads that sleep between batches (spin=None: the serving default): the
        # cores are shared with decode; benchmarks of the bare engine may pass spin=True.
        spin = provider_name(chosen[0]) != "CPUExecutionProvider" if spin is None else spin
        opts = session_options(threads, inter_op_threads, optimization_level, parallel, spin=spin)
        try:
            self.session = ort.InferenceSession(str(self.version_dir / self.manifest.onnx.file), opts,
                                                providers=chosen)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load {self.version_dir / self.manifest.onnx.file}: {e}") from e
        if cuda_device is not None:
            self._check_on_gpu(cuda_device, available)
        active = self.session.get_providers()[0]
        self.provider = active
        self.name = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda",
                     "TensorrtExecutionProvider": "onnxruntime-tensorrt"}.get(active, active)
        self.max_batch_size = max_batch_size
        self.score_output = self.manifest.calibration.score_output
        self.size = self.manifest.input_size
        self.io_binding = (active in _GPU_PROVIDERS) if io_binding is None else io_binding

    def _check_on_gpu(self, device_id: int, available: list[str]) -> None:
        """EngineError unless the session runs on a GPU provider, on CUDA device ``device_id``."""
        active = self.session.get_providers()
        gpu = [p for p in active if p in _GPU_PROVIDERS]
        if not gpu:
            why = ("this onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)"
                   if "CUDAExecutionProvider" not in available else
                   "its CUDA provider did not start (no such GPU, or CUDA libraries missing: see the log)")
            raise EngineError(f"device cuda:{device_id} asked for, but {why}; the session would run on {active}. "
                              "Set the device to auto (GPU if usable, else CPU) or cpu to serve on the CPU")
        # onnxruntime's own fallback from TensorRT retries CUDA without our options (device 0).
        got = self.session.get_provider_options().get(gpu[0], {}).get("device_id")
        if got is not None and str(got) != str(device_id):
            raise EngineError(f"device cuda:{device_id} asked for, but onnxruntime's {gpu[0]} runs on device {got}")

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(images, self.size, self.max_batch_size)
        if self.io_binding:
            scores, maps = self._run_bound(batch)
        else:
            scores, maps = self.session.run([self.score_output, MAP_OUTPUT], {"images": batch})
        return scores.astype(np.float32, copy=False), maps.astype(np.float32, copy=False)

    def _run_bound(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_cpu_input("images", batch)
        binding.bind_output(self.score_output, "cpu")
        binding.bind_output(MAP_OUTPUT, "cpu")
        self.session.run_with_iobinding(binding)
        scores, maps = binding.copy_outputs_to_cpu()
        return scores, maps
