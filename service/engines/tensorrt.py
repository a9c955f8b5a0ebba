"""The TensorRT engine: a prebuilt ``model.plan`` (FP16) run with the TensorRT 10 API.

Device buffers are torch CUDA tensors and copies/launches go on a ``torch.cuda.Stream``
(no pycuda). Buffers are allocated once at the profile's maximum batch; a batch runs as
``set_input_shape`` -> async host-to-device copy -> ``execute_async_v3`` -> async
device-to-host copies into pinned memory -> one stream synchronise. Batches larger than
the profile maximum are split into chunks.

Loading refuses, with :class:`~service.engines.base.EngineError` and the reason, whenever the
plan cannot be trusted to run here: no TensorRT, no CUDA, another TensorRT version or
another GPU than the plan was built with (plans are not portable). ``load_engine("auto")``
then falls back to ONNX Runtime. The plan's sha256 is verified against the manifest
before it is deserialised.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest, TensorRTInfo
from service.engines.base import MAP_OUTPUT, EngineError, check_batch, cuda_index

log = logging.getLogger(__name__)

INPUT_NAME = "images"


def check_plan_compatible(info: TensorRTInfo, trt_version: str, gpu_name: str, capability: str) -> None:
    """Raise :class:`EngineError` listing every way this host differs from the one the plan
    was built on (TensorRT version, GPU model, compute capability); pure, no CUDA needed."""
    problems = []
    if info.tensorrt_version.strip() != trt_version.strip():
        problems.append(f"it was built with TensorRT {info.tensorrt_version} and this host has {trt_version}")
    if info.gpu_name.strip() != gpu_name.strip():
        problems.append(f"it was built on a {info.gpu_name!r} and this GPU is a {gpu_name!r}")
    if info.compute_capability.strip() != capability.strip():
        problems.append(f"it was built for compute capability {info.compute_capability} and this GPU has "
                        f"{capability}")
    if problems:
        raise EngineError(f"TensorRT plan {info.file} cannot run here: " + "; ".join(problems)
                          + ". Rebuild it on this host (msflow export --tensorrt) or serve the ONNX engine")


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
             trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "INT64"):
        table[trt.DataType.INT64] = torch.int64
    if dtype not in table:
        raise EngineError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]


class TensorRTEngine:
    """``model.plan`` on CUDA device ``device`` (``cuda:N``; ``cuda`` is device 0; ``auto``:
    the current CUDA device)."""

    def __init__(self, version_dir: str | Path, manifest: Manifest | None = None, max_batch_size: int = 64,
                 verify: bool = True, device: str = "auto") -> None:
        self.version_dir = Path(version_dir)
        self.manifest = manifest or Manifest.read(self.version_dir)
        info = self.manifest.tensorrt
        if info is None:
            raise EngineError(f"{self.version_dir} has no TensorRT plan (export with --tensorrt on a CUDA host)")
        if device == "cpu":
            raise EngineError(f"TensorRT plan {info.file} runs on CUDA only, and the device asked for is cpu")
        index = cuda_index(device)
        try:
            import tensorrt as trt
        except ImportError as e:
            raise EngineError(f"TensorRT is not installed here, cannot run {info.file}") from e
        import torch

        if not torch.cuda.is_available():
            raise EngineError(f"no CUDA GPU visible here, cannot run TensorRT plan {info.file}")
        if index is not None and index >= torch.cuda.device_count():
            raise EngineError(f"device {device!r} asked for, but this host has {torch.cuda.device_count()} CUDA "
                              "device(s)")
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        major, minor = torch.cuda.get_device_capability(self.device)
        check_plan_compatible(info, trt.__version__, torch.cuda.get_device_name(self.device), f"{major}.{minor}")
        if verify:
            self.manifest.verify_files(self.version_dir, [info.file])  # before deserialising: ManifestError

        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        plan = (self.version_dir / info.file).read_bytes()
        # TensorRT works on the CUDA device current when the runtime, engine and context are
        # made: device N, not whichever device this thread happens to have.
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise EngineError(f"TensorRT could not deserialise {self.version_dir / info.file}")
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
            self.stream = torch.cuda.Stream(self.device)

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME]:
            raise EngineError(f"plan inputs are {inputs}, expected [{INPUT_NAME!r}]")
        self.outputs = [n for n in names if n not in inputs]
        self.score_output = self.manifest.calibration.score_output
        for needed in (self.score_output, MAP_OUTPUT):
            if needed not in self.outputs:
                raise EngineError(f"plan has no output {needed!r} (outputs: {self.outputs})")
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.profile_min, self.profile_max = int(lo[0]), int(hi[0])
        self.size = self.manifest.input_size
        self.max_batch_size = max_batch_size
        self.name = "tensorrt"
        self._lock = threading.Lock()
        with torch.cuda.device(self.device):
            self._allocate()

    def _allocate(self) -> None:
        """Device buffers at the profile maximum, pinned host mirrors, addresses bound once."""
        import torch

        trt, n, s = self._trt, self.profile_max, self.size
        in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(INPUT_NAME))
        if in_dtype != torch.uint8:
            raise EngineError(f"plan input {INPUT_NAME!r} is {in_dtype}, expected uint8")
        self._host_in = torch.empty((n, s, s, 3), dtype=torch.uint8, pin_memory=True)
        self._dev = {INPUT_NAME: torch.empty((n, s, s, 3), dtype=torch.uint8, device=self.device)}
        self._host_out: dict[str, Any] = {}
        if not self.context.set_input_shape(INPUT_NAME, (n, s, s, 3)):
            raise EngineError(f"the plan refuses its own profile maximum {n}")
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            self._dev[name] = torch.empty(shape, dtype=dtype, device=self.device)
            if name in (self.score_output, MAP_OUTPUT):
                self._host_out[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
        # Every I/O tensor needs an address (unused outputs too). A smaller batch uses the
        # leading rows of the same contiguous buffers, so the addresses never change.
        for name, buf in self._dev.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise EngineError(f"TensorRT refused the address of {name!r}")

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        batch = check_batch(images, self.size, self.max_batch_size)
        scores, maps = [], []
        with self._lock, torch.cuda.device(self.device):  # the batcher's thread: make device N current
            for start in range(0, len(batch), self.profile_max):
                s, m = self._run_chunk(batch[start : start + self.profile_max])
                scores.append(s)
                maps.append(m)
        return np.concatenate(scores), np.concatenate(maps)

    def _run_chunk(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n = len(chunk)
        run_n = max(n, self.profile_min)  # below the profile minimum: pad with blank images
        host_in = self._host_in.numpy()  # the pinned buffer, as numpy (shared memory)
        host_in[:n] = chunk
        if run_n > n:
            host_in[n:run_n] = 0
        if not self.context.set_input_shape(INPUT_NAME, (run_n, self.size, self.size, 3)):
            raise EngineError(f"batch {run_n} is outside the plan's profile {self.profile_min}..{self.profile_max}")
        with torch.cuda.stream(self.stream):
            self._dev[INPUT_NAME][:run_n].copy_(self._host_in[:run_n], non_blocking=True)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed; see the TensorRT log")
            for name in (self.score_output, MAP_OUTPUT):
                self._host_out[name][:n].copy_(self._dev[name][:n], non_blocking=True)
        self.stream.synchronize()
        scores = self._host_out[self.score_output][:n].numpy().astype(np.float32, copy=True)
        maps = self._host_out[MAP_OUTPUT][:n].numpy().astype(np.float32, copy=True)
        return scores, maps
