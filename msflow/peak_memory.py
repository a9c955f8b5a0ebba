"""The memory a benchmark's measurement takes: this process's peak RSS, and the GPU's.

- ``rss_peak_mib``: peak resident memory of the process above its level at the start of
  that (engine, batch) measurement. Linux lets a process reset its own high-water mark
  (``echo 5 > /proc/self/clear_refs``), so this is the kernel's exact ``VmHWM`` delta; where
  that is refused, a 1 ms sampling thread (psutil, else ``/proc/self/status``) reads RSS
  and can miss spikes shorter than that. Allocator caching means an engine measured later
  may reuse memory an earlier one freed; load cost is reported separately.
- CUDA: ``gpu_peak_mib`` is ``torch.cuda.max_memory_allocated`` above its start, which sees
  torch's allocations only (torch engines, TensorRT I/O buffers), not TensorRT's or
  onnxruntime's own pools; ``gpu_used_mib`` is the device-wide memory in use (cudaMemGetInfo)
  above the level before the engine loaded, which does include them (pools are kept, so it
  is close to their peak).

Separate from :mod:`msflow.bench`, which times engines: this is how the kernel and torch
are asked what a block of code held, whatever the block does.
"""

from __future__ import annotations

import gc
import threading

from msflow.engine_catalog import cuda_available

MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        kib = _status_kib("VmRSS")
        return kib * 1024 if kib is not None else 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


MEMORY_METHOD = (
    "rss_peak_mib: process peak RSS above its level at the start of the measurement (kernel VmHWM after "
    "resetting it via /proc/self/clear_refs; else a 1 ms RSS sampling thread, which can miss short spikes). "
    "gpu_peak_mib: torch.cuda.max_memory_allocated delta (torch allocations only). gpu_used_mib: device memory "
    "in use (cudaMemGetInfo) above the level before the engine loaded, including onnxruntime/TensorRT pools.")


class PeakMemory:
    """Peak memory increase of this process (and of the GPU) while the block runs."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.rss_peak_mib: float | None = None
        self.gpu_peak_mib: float | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self._base = rss_bytes()
        self._hwm = _reset_hwm()
        self.method = "vmhwm" if self._hwm else "sampling"
        self._peak = self._base
        self._stop = threading.Event()
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_base = torch.cuda.memory_allocated()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self._hwm:
            kib = _status_kib("VmHWM")
            self._peak = max(self._peak, kib * 1024 if kib else 0)
        else:
            self._stop.set()
            self._thread.join()
        self.rss_peak_mib = max(self._peak - self._base, 0) / MIB
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.gpu_peak_mib = max(torch.cuda.max_memory_allocated() - self._gpu_base, 0) / MIB


def gpu_used_bytes() -> int | None:
    if not cuda_available():
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return int(total - free)
