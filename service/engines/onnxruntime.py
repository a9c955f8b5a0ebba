"""The onnxruntime backend: :class:`OnnxEngine` over a version's ``model.onnx``.

With onnxruntime-gpu, TensorRT's execution provider comes first. Its options
(:func:`tensorrt_provider_options`) fix the engine's optimisation profile to batches
1..max_batch_size of ``images [B, S, S, 3]``: without them the provider sizes the engine on
the first batch it sees and builds it again (minutes on a GPU) for every batch outside what
it has seen, and an explicit profile also moves the build to session creation, before
warm-up. Built engines and TensorRT's timing cache are kept in a writable folder
(``MSFLOW_ORT_TENSORRT_CACHE_DIR``), so a restart loads them instead of building again,
within a byte budget (``MSFLOW_ORT_TENSORRT_CACHE_MAX_BYTES``, :mod:`service.engines.ort_cache`):
the least recently used models' engines no process holds are removed before another is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.manifest import Manifest, sha256_file
from service.engines.base import MAP_OUTPUT, EngineError, check_batch
from service.engines.ort_cache import DEFAULT_MAX_BYTES, CacheHold, reserve_engine_cache

log = logging.getLogger(__name__)

INPUT_NAME = "images"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# A provider as onnxruntime takes it: its name, or (name, options) such as {"device_id": 1}.
Provider = str | tuple[str, dict[str, Any]]


def provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def tensorrt_provider_options(input_size: int, max_batch_size: int, cache_dir: Path | None,
                              model_sha256: str) -> dict[str, Any]:
    """ONNX Runtime's TensorRT provider options for a version's graph. Pure.

    - Profile: batches 1..``max_batch_size`` (the engine's ``check_batch`` refuses more), tuned
      for ``max_batch_size`` (the batcher's full batch, what it runs under load), at
      ``input_size``. All three shapes are needed for the provider to use any.
    - FP16, as the TensorRT plan on TensorRT 10 (``models/tensorrt_build.py``; onnxruntime-gpu
      links TensorRT 10), with ``trt_layer_norm_fp32_fallback``: each Pow followed by a Reduce
      (the graph's ``(z**2).mean``) stays FP32, as the plan's ``keep_numerics_in_fp32`` keeps
      it. The plan's other FP32 layers (TopK, exp/log) cannot be asked of the provider.
    - Cache (``cache_dir`` not None): engines in ``cache_dir/<model sha256>``, the timing
      cache in ``cache_dir``. ONNX Runtime names a cached engine after the model's file name
      and graph structure, not its weights (``TRTGenerateId``), and every version is a
      ``model.onnx`` of the same graph: in one shared folder a version would load another's
      engine. Timings are per GPU and layer, not per model, so they are shared.
    """
    if input_size < 1 or max_batch_size < 1:
        raise ValueError(f"need input_size >= 1 and max_batch_size >= 1, got {input_size}, {max_batch_size}")
    image = f"{input_size}x{input_size}x3"
    options: dict[str, Any] = {
        "trt_profile_min_shapes": f"{INPUT_NAME}:1x{image}",
        "trt_profile_opt_shapes": f"{INPUT_NAME}:{max_batch_size}x{image}",
        "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch_size}x{image}",
        "trt_fp16_enable": True,
        "trt_layer_norm_fp32_fallback": True,
    }
    if cache_dir is not None:
        options.update({
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir / model_sha256),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir),
        })
    return options


def with_tensorrt_options(providers: list[Provider], options: dict[str, Any]) -> list[Provider]:
    """``providers`` with ``options`` given to TensorRT's; options already there (the caller's
    ``device_id``) are kept. Pure."""
    return [(TENSORRT_PROVIDER, {**options, **({} if isinstance(p, str) else p[1])})
            if provider_name(p) == TENSORRT_PROVIDER else p for p in providers]


def default_tensorrt_cache_dir() -> Path:
    """``<TMPDIR>/msflow-ort-tensorrt-<uid>``: writable where the server runs (Kubernetes
    mounts an emptyDir on /tmp, which outlives a container restart), never the model store."""
    return Path(tempfile.gettempdir()) / f"msflow-ort-tensorrt-{os.geteuid()}"


def prepare_tensorrt_cache(cache_dir: Path | None, model_sha256: str) -> Path | None:
    """Make ``cache_dir`` (None: :func:`default_tensorrt_cache_dir`) and its folder for the
    model, private to this user; the folder to cache in, or None (with a warning) when it
    cannot be used: the engine is then built at every start, but it serves.

    The default is in the shared temp folder, so it must be this user's own folder, no link,
    and writable by no one else: a folder of that name made (or writable) by anyone else could
    hold engines planted for this server to load. A folder the operator set is trusted as set."""
    default = cache_dir is None
    root = default_tensorrt_cache_dir() if default else Path(cache_dir)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if default:
            st = root.lstat()
            if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
                log.warning("TensorRT engine cache %s is not this user's own folder: not used (set "
                            "MSFLOW_ORT_TENSORRT_CACHE_DIR); engines are built at every start", root)
                return None
            # Ours but writable by others: engines may already be planted in it (chmod would
            # keep them), so it is refused as another's folder is.
            if st.st_mode & 0o022:
                log.warning("TensorRT engine cache %s is writable by other users (mode %o): not used; remove "
                            "it or set MSFLOW_ORT_TENSORRT_CACHE_DIR; engines are built at every start", root,
                            stat.S_IMODE(st.st_mode))
                return None
        (root / model_sha256).mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        log.warning("TensorRT engine cache %s cannot be used (%s): engines are built at every start; set "
                    "MSFLOW_ORT_TENSORRT_CACHE_DIR to a writable folder", root, e)
        return None
    return root


_warned_over_budget: set[str] = set()  # model sha256s: the warning is given once per process


def budget_tensorrt_cache(root: Path, model_sha256: str, max_bytes: int, onnx_bytes: int) -> CacheHold | None:
    """The model's hold on its cache folder, room made for its engine within ``max_bytes``
    (:func:`service.engines.ort_cache.reserve_engine_cache`); None, with a warning once per
    model, when the budget cannot hold its engine (the models other processes serve fill it)
    or the folder cannot be held: the model is then served without an engine cache, built at
    every start, rather than spend past the budget (on Kubernetes: /tmp's emptyDir sizeLimit,
    past which the pod is evicted)."""
    try:
        hold = reserve_engine_cache(root, model_sha256, max_bytes, onnx_bytes)
        why = "the models in use leave no room for its engine"
    except OSError as e:
        hold, why = None, str(e)
    if hold is None and model_sha256 not in _warned_over_budget:
        _warned_over_budget.add(model_sha256)
        log.warning("TensorRT engine cache %s (MSFLOW_ORT_TENSORRT_CACHE_MAX_BYTES=%d): model %s is served "
                    "without an engine cache (%s); its engine is built at every start", root, max_bytes,
                    model_sha256[:12], why)
    return hold


@contextlib.contextmanager
def _build_lock(model_cache: Path | None) -> Iterator[None]:
    """One process at a time builds a model's engine into the shared cache (workers starting
    together); the next loads what the first wrote instead of building it again beside it."""
    if model_cache is None:
        yield
        return
    import fcntl

    with open(model_cache / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """Which file ``path`` is and its last write (inode, size, mtime, ctime); None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


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

    TensorRT's provider gets :func:`tensorrt_provider_options` (its engine is then built while
    the session is created). When it fails there, onnxruntime's Python API retries the session
    once with CUDA and CPU only, without their options, and says so on stdout only; the
    engine logs a warning naming the provider that runs (``providers``:
    ``session.get_providers()``, in order), and ``name`` is that provider's.
    ``tensorrt_cache_dir``: where TensorRT's engines are cached (None: the default folder);
    ``tensorrt_cache_max_bytes``: that cache's budget (:func:`budget_tensorrt_cache`; None:
    ``DEFAULT_MAX_BYTES``, as ``MSFLOW_ORT_TENSORRT_CACHE_MAX_BYTES``'s default). The
    engine holds its model's cache folder for its life, so no other process prunes it.
    """

    def __init__(self, version_dir: str | Path, providers: list[Provider] | None = None, threads: int | None = None,
                 manifest: Manifest | None = None, max_batch_size: int = 64, verify: bool = True, *,
                 inter_op_threads: int | None = None, optimization_level: str = "all",
                 parallel: bool = False, io_binding: bool | None = None, spin: bool | None = None,
                 cuda_device: int | None = None, tensorrt_cache_dir: Path | None = None,
                 tensorrt_cache_max_bytes: int | None = None) -> None:
        import onnxruntime as ort

        self.version_dir = Path(version_dir)
        self.manifest = manifest or Manifest.read(self.version_dir)
        model_path = self.version_dir / self.manifest.onnx.file
        checked = _identity(model_path)  # before the check: onnxruntime opens the path again
        if verify:
            self.manifest.verify_files(self.version_dir, [self.manifest.onnx.file])
        available = ort.get_available_providers()
        wanted = providers or ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if provider_name(p) in available] or ["CPUExecutionProvider"]
        model_cache = None
        self._tensorrt_cache: CacheHold | None = None
        if any(provider_name(p) == TENSORRT_PROVIDER for p in chosen):
            # The cache is keyed by the model's content: its digest in the manifest (just
            # verified), or the file's own when the caller skipped the check.
            listed = self.manifest.files.get(self.manifest.onnx.file)
            sha256 = listed.sha256 if verify and listed is not None else sha256_file(
                self.version_dir / self.manifest.onnx.file)
            cache = prepare_tensorrt_cache(tensorrt_cache_dir, sha256)
            if cache is not None:
                onnx_bytes = (self.version_dir / self.manifest.onnx.file).stat().st_size
                self._tensorrt_cache = budget_tensorrt_cache(
                    cache, sha256, DEFAULT_MAX_BYTES if tensorrt_cache_max_bytes is None else tensorrt_cache_max_bytes,
                    onnx_bytes)
                cache = cache if self._tensorrt_cache is not None else None
            model_cache = None if cache is None else cache / sha256
            chosen = with_tensorrt_options(chosen, tensorrt_provider_options(
                self.manifest.input_size, max_batch_size, cache, sha256))
        # On CPU, threads that sleep between batches (spin=None: the serving default): the
        # cores are shared with decode; benchmarks of the bare engine may pass spin=True.
        spin = provider_name(chosen[0]) != "CPUExecutionProvider" if spin is None else spin
        opts = session_options(threads, inter_op_threads, optimization_level, parallel, spin=spin)
        try:
            with _build_lock(model_cache):
                self.session = ort.InferenceSession(str(self.version_dir / self.manifest.onnx.file), opts,
                                                    providers=chosen)
        except Exception as e:  # onnxruntime raises its own exception types
            if self._tensorrt_cache is not None:
                self._tensorrt_cache.close()
            raise EngineError(f"cannot load {self.version_dir / self.manifest.onnx.file}: {e}") from e
        finally:
            if self._tensorrt_cache is not None:
                self._tensorrt_cache.release_reservation()  # the engine is written: its bytes count now
        if verify and _identity(model_path) != checked:  # replaced or rewritten meanwhile: not what was checked
            if self._tensorrt_cache is not None:
                self._tensorrt_cache.close()
            raise EngineError(f"{model_path} changed while it was checked and loaded (a copy landing?); "
                              "not served, the folder is tried again once it changes")
        self.providers: list[str] = self.session.get_providers()
        if cuda_device is not None:
            self._check_on_gpu(cuda_device, available)
        active = self.providers[0]
        if active != TENSORRT_PROVIDER and self._tensorrt_cache is not None:
            self._tensorrt_cache.close()  # no engine of ours to keep: the folder may be pruned
            self._tensorrt_cache = None
        if active != provider_name(chosen[0]):
            log.warning("%s: onnxruntime could not start %s and runs on %s (its 'EP Error' on stdout says why)",
                        self.version_dir, provider_name(chosen[0]), ", ".join(self.providers))
        log.info("%s: onnxruntime runs on %s%s", self.version_dir, ", ".join(self.providers),
                 f" (TensorRT engines cached in {model_cache})" if active == TENSORRT_PROVIDER and model_cache
                 else "")
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
