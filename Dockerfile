# syntax=docker/dockerfile:1.7
#
# MSFlow inspection service image.
#
#   docker build -t msflow:gpu .                          # CUDA + TensorRT (default)
#   docker build -t msflow:cpu --build-arg VARIANT=cpu .  # CPU only, much smaller
#   docker run --gpus all -p 8000:8000 -v $PWD/model_store:/models msflow:gpu
#
# Base image choice (GPU): nvidia/cuda:<12.x>-cudnn-runtime + TensorRT from PyPI, rather
# than nvcr.io/nvidia/tensorrt:<tag>-py3. The NGC TensorRT image is ~9 GB, ships compilers,
# samples and a Python/TensorRT pair fixed by its tag. The cudnn-runtime image is the
# smallest base that gives onnxruntime-gpu's CUDA execution provider the system CUDA/cuDNN
# libraries it links against, and the pip `tensorrt` wheels are self-contained (libnvinfer
# inside the wheel). Above all, a TensorRT plan (model.plan) only loads under the TensorRT
# version that built it: taking TensorRT from the project's own `gpu` extra keeps the
# exporter (`msflow export --tensorrt`, the compose `trainer` profile runs it in this same
# image) and the server on one pinned version.
#
# Build arguments:
#   VARIANT           gpu | cpu
#   CUDA_IMAGE        CUDA runtime base of the gpu variant (needs python3 >= 3.10 from apt)
#   TORCH_VERSION     pinned like scripts/setup.sh: torch first, so pip never resolves
#                     a plain `torch` requirement to some other (multi-GB) build
#   TORCH_CUDA_INDEX  PyTorch wheel index of the gpu variant (match CUDA_IMAGE's major)
#   TORCH_CPU_INDEX   PyTorch wheel index of the cpu variant
#
# Keep the cpu variant's install commands in sync with scripts/check-docker-install.sh,
# which replays them in a fresh virtual environment where Docker is not available.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- bases (one per variant)
FROM ${CUDA_IMAGE} AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/*
ENV IMAGE_VARIANT=gpu \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM ${PYTHON_IMAGE} AS base-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
ENV IMAGE_VARIANT=cpu

# ---------------------------------------------------------------- builder
FROM base-${VARIANT} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python -m pip install --upgrade pip

# 1. torch, pinned, from the wheel index that matches the variant.
RUN if [ "$IMAGE_VARIANT" = cpu ]; then index="$TORCH_CPU_INDEX"; else index="$TORCH_CUDA_INDEX"; fi \
 && python -m pip install "torch==${TORCH_VERSION}" --index-url "$index"

# 2. The project's dependencies, in their own layer: only pyproject.toml invalidates it.
#    Empty stand-in packages let pip resolve `.[extras]` before the sources are copied.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN mkdir -p models service msflow \
 && touch models/__init__.py service/__init__.py msflow/__init__.py \
 && if [ "$IMAGE_VARIANT" = gpu ]; then python -m pip install ".[gpu]"; else python -m pip install .; fi

# onnxruntime (a core dependency) and onnxruntime-gpu (the gpu extra) install the same
# `onnxruntime` package; when both are present the CPU one can shadow the CUDA/TensorRT
# providers. Keep only the GPU build in the gpu variant.
RUN if [ "$IMAGE_VARIANT" = gpu ]; then \
      python -m pip uninstall -y onnxruntime \
   && python -m pip install --force-reinstall --no-deps "$(python -m pip freeze | grep -iE '^onnxruntime[-_]gpu==')"; \
    fi

# 3. The sources (non-editable install; the image carries no source tree).
COPY models/ models/
COPY service/ service/
COPY msflow/ msflow/
RUN python -m pip install --no-deps --force-reinstall . \
 && msflow --help >/dev/null \
 && python -c "import models, service, msflow.cli"

# ---------------------------------------------------------------- runtime
FROM base-${VARIANT} AS runtime
LABEL org.opencontainers.image.title="msflow-inspect" \
      org.opencontainers.image.description="MSFlow visual inspection service (FastAPI, ONNX Runtime / TensorRT)"

ARG MSFLOW_UID=10001
RUN groupadd --system --gid ${MSFLOW_UID} msflow \
 && useradd --system --uid ${MSFLOW_UID} --gid msflow --home-dir /home/msflow --create-home \
            --shell /usr/sbin/nologin msflow \
 && mkdir -p /models /data /review \
 && chown msflow:msflow /models /data /review

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MSFLOW_MODEL_STORE=/models \
    MSFLOW_HOST=0.0.0.0 \
    MSFLOW_PORT=8000 \
    MSFLOW_ENGINE=auto \
    MPLCONFIGDIR=/tmp/matplotlib

# The model store is mounted (or filled by the compose `trainer` profile); the image holds none.
# /review: the review queue's store (MSFLOW_REVIEW_STORE in compose and k8s), owned by the
# service user so a fresh named volume is writable.
VOLUME ["/models", "/review"]
WORKDIR /home/msflow
USER msflow:msflow
EXPOSE 8000

# Liveness only (the process answers); readiness (models loaded, Redis) is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MSFLOW_PORT', '8000'), timeout=4)" || exit 1

# `docker run IMAGE worker` (or compose `command: [worker]`) runs the Redis job worker instead.
ENTRYPOINT ["msflow"]
CMD ["serve"]
