"""Build the TensorRT plan (``model.plan``) of an exported ONNX graph. CUDA hosts only.

TensorRT 10 Python API: ``Builder`` -> network (always explicit batch in TRT 10) ->
``OnnxParser`` -> builder config (FP16, workspace pool limit, one optimisation profile over
the batch axis of ``images [B, S, S, 3] uint8``) -> ``build_serialized_network``.

A plan only runs with the TensorRT version and the GPU model it was built with, so the
returned :class:`~models.manifest.TensorRTInfo` records both (and the compute capability);
``service.tensorrt_engine`` refuses a plan whose record does not match the host.

FP16 needs TensorRT 10: it is asked for with the weak-typing builder API (``BuilderFlag.FP16``,
``PREFER_PRECISION_CONSTRAINTS``, per-layer ``precision``/``set_output_type``,
``platform_has_fast_fp16``), which TensorRT 11 removed (strongly typed networks only; the
migration guide's "Removed Python APIs and Replacements"). With TensorRT 11 the float32
graph builds a strongly typed FP32 plan, recorded as such (:func:`plan_precision`).

uint8 input: TensorRT 10 accepts ``UINT8`` network inputs, but only as the input of a cast
to float/half (the ``kUINT8`` rules of ``DataType``); a Shape or Transpose reading the
uint8 tensor is rejected. The exported graph starts with ``Transpose(images)`` and
``Shape(images)`` (the cast to float comes after the NHWC -> NCHW permute), so the graph
handed to the parser gets one ``Cast(images -> float32)`` inserted in front of every
consumer. This is exact (every uint8 value is a float) and changes only the copy given to
TensorRT: ``model.onnx`` on disk, and its sha256 in the manifest, stay as exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from models.atomic_files import write_atomic
from models.manifest import TensorRTInfo

log = logging.getLogger(__name__)

INPUT_NAME = "images"
DEFAULT_WORKSPACE_BYTES = 4 << 30
# TensorRT's ITopKLayer handles K <= 3840; the graph's top-k is 3% of the input pixels,
# so inputs above ~357 px exceed it (the ONNX path has no such limit).
TOPK_LIMIT = 3840


class TensorRTUnavailable(RuntimeError):
    """This host cannot build a plan (no TensorRT, too old a TensorRT, no CUDA GPU): what to
    install or to drop (``--tensorrt``), in one line; the CLI prints it without a traceback."""


# The first TensorRT without the weak-typing (FP16 builder flag) API.
STRONGLY_TYPED_ONLY_MAJOR = 11


def tensorrt_major(version: str) -> int:
    """The major version of a ``tensorrt.__version__`` such as ``10.13.0.35``."""
    head = version.strip().split(".")[0]
    if not head.isdigit():
        raise TensorRTUnavailable(f"cannot read the TensorRT version {version!r}")
    return int(head)


def plan_precision(trt_version: str, fp16: bool) -> str:
    """``fp16`` or ``fp32``: the precision a plan built with TensorRT ``trt_version`` gets when
    ``fp16`` is asked for (or not). Below 10: :class:`TensorRTUnavailable` (the engine uses the
    TensorRT 10 tensor API). From 11 on FP16 cannot be asked of the builder any more (weak
    typing removed), so the plan is FP32. Pure: testable without TensorRT."""
    major = tensorrt_major(trt_version)
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt_version} is too old: the plan builder and engine use the "
                                  "TensorRT 10 API (tensor names, set_input_shape, execute_async_v3)")
    return "fp16" if fp16 and major < STRONGLY_TYPED_ONLY_MAJOR else "fp32"


def require_tensorrt() -> "object":
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable("TensorRT is not installed (pip install tensorrt, TensorRT >= 10 on a CUDA host); "
                           "export without --tensorrt to ship the ONNX engine only") from e
    plan_precision(trt.__version__, fp16=False)  # too old: refused before the minutes of export
    return trt


def require_cuda() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("building a TensorRT plan needs a CUDA GPU and none is visible to torch "
                           "(check the driver and CUDA_VISIBLE_DEVICES); export without --tensorrt")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def cast_uint8_input(model: "object", name: str = INPUT_NAME) -> int:
    """Insert ``Cast(name -> float32)`` before every consumer of the uint8 graph input
    ``name`` that is not already such a cast; returns the number of consumers rewired."""
    import onnx

    graph = model.graph
    inputs = [i for i in graph.input if i.name == name]
    if not inputs:
        raise RuntimeError(f"the ONNX graph has no input {name!r}")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        return 0
    cast_out = f"{name}__as_float32"
    rewired = 0
    for node in graph.node:
        is_float_cast = node.op_type == "Cast" and any(
            a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
        if is_float_cast:
            continue
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = cast_out
                rewired += 1
    if rewired:
        cast = onnx.helper.make_node("Cast", [name], [cast_out], name=f"{name}_cast_to_float32",
                                     to=onnx.TensorProto.FLOAT)
        graph.node.insert(0, cast)  # the graph stays topologically sorted: it reads only the input
        # Intermediate uint8 tensors (the permuted image before its cast) are float now;
        # drop their recorded types rather than guess (value_info is optional).
        stale = [v for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.UINT8]
        for v in stale:
            graph.value_info.remove(v)
    return rewired


def keep_numerics_in_fp32(network: "object", trt: "object") -> int:
    """Ask TensorRT to keep the overflow-prone layers in FP32 inside an FP16 build.

    FP16 tops out at 65504: squared latents of a barely trained flow (``z**2``), their
    reductions (log p, log-sum-exp, top-k means) and exp/log can overflow or lose the
    ranking, while the convolutions that dominate the cost are safe in FP16. Marks
    Reduce, TopK, Normalization, Unary exp/log and ElementWise pow layers as FP32 (with
    FP32 outputs); used with ``PREFER_PRECISION_CONSTRAINTS`` so TensorRT may still
    override a constraint it cannot honour (it logs a warning) instead of failing.
    Returns the number of layers constrained.
    """
    always = {trt.LayerType.REDUCE, trt.LayerType.TOPK}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        always.add(trt.LayerType.NORMALIZATION)
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF)
    marked = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        keep = layer.type in always
        try:  # the Python API hands out ILayer; the op needs the concrete class (as polygraphy does)
            if layer.type == trt.LayerType.UNARY:
                layer.__class__ = trt.IUnaryLayer
                keep = layer.op in (trt.UnaryOperation.EXP, trt.UnaryOperation.LOG)
            elif layer.type == trt.LayerType.ELEMENTWISE:
                layer.__class__ = trt.IElementWiseLayer
                keep = layer.op == trt.ElementWiseOperation.POW
        except (AttributeError, TypeError):
            continue
        float_outputs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in float_types]
        if not keep or not float_outputs:  # shape arithmetic on integers stays as it is
            continue
        layer.precision = trt.float32
        for j in float_outputs:
            layer.set_output_type(j, trt.float32)
        marked += 1
    return marked


def build_plan(onnx_path: str | Path, plan_path: str | Path, input_size: int, min_batch: int = 1,
               opt_batch: int = 8, max_batch: int = 32, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
               fp16: bool = True, keep_fp32: bool = True) -> TensorRTInfo:
    """Build an FP16 TensorRT plan from ``onnx_path`` into ``plan_path`` (FP32 with TensorRT 11
    or ``fp16=False``: :func:`plan_precision`; the returned record says which).

    The optimisation profile covers batches ``min_batch..max_batch`` (tuned for
    ``opt_batch``) of ``images [B, input_size, input_size, 3] uint8``. Raises
    ``RuntimeError`` with the reason when TensorRT or CUDA is missing or the build fails.
    ``keep_fp32``: see :func:`keep_numerics_in_fp32`.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    trt = require_tensorrt()
    gpu_name, capability = require_cuda()
    precision = plan_precision(trt.__version__, fp16)
    if fp16 and precision != "fp16":
        log.warning("TensorRT %s builds strongly typed networks only (BuilderFlag.FP16 was removed in TensorRT "
                    "%d): building an FP32 plan from the float32 graph; TensorRT 10 builds the FP16 one",
                    trt.__version__, STRONGLY_TYPED_ONLY_MAJOR)

    import onnx

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    model = onnx.load(str(onnx_path))
    if cast_uint8_input(model):
        log.info("inserted a uint8 -> float32 cast in front of %r for TensorRT", INPUT_NAME)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")

    inp = next((network.get_input(i) for i in range(network.num_inputs)
                if network.get_input(i).name == INPUT_NAME), None)
    if inp is None:
        raise RuntimeError(f"the parsed network has no input {INPUT_NAME!r}")
    if inp.dtype != trt.DataType.UINT8:
        raise RuntimeError(f"input {INPUT_NAME!r} parsed as {inp.dtype}, expected UINT8")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; building FP16 anyway (it will be slow)")
        config.set_flag(trt.BuilderFlag.FP16)
        if keep_fp32:
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            log.info("%d overflow-prone layers kept in FP32", keep_numerics_in_fp32(network, trt))
    profile = builder.create_optimization_profile()
    shape = (input_size, input_size, 3)
    profile.set_shape(INPUT_NAME, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    log.info("building TensorRT %s plan (%s, batch %d/%d/%d) on %s; this takes minutes", trt.__version__,
             precision, min_batch, opt_batch, max_batch, gpu_name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        hint = ""
        k = max(1, int(input_size * input_size * 0.03))
        if k > TOPK_LIMIT:
            hint = f" (with the default 3% top-k, ~{k} pixels may exceed TensorRT's TopK limit of {TOPK_LIMIT})"
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path}{hint}; see the TensorRT log above")
    write_atomic(plan_path, lambda f: f.write(memoryview(serialized)))
    return TensorRTInfo(file=plan_path.name, tensorrt_version=trt.__version__, gpu_name=gpu_name,
                        compute_capability=capability, precision=precision,
                        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch)


__all__ = ["TensorRTUnavailable", "build_plan", "cast_uint8_input", "keep_numerics_in_fp32", "plan_precision",
           "INPUT_NAME", "TOPK_LIMIT"]
