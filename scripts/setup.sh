#!/usr/bin/env bash
# Create .venv and install the project. Torch is pinned and installed FIRST: a plain
# `torch` requirement on a machine without it would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MSFLOW_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-test}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU build where the machine provides it)"
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
echo "setup: installing the project with extras [$EXTRAS]"
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, onnxruntime; print('setup: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
