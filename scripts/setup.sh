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
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC (CPU build where the machine provides it)"
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
# The project (editable) again only when the venv's install is not this checkout's, or
# pyproject.toml changed since: reinstalling on every run needed the package index (pip's
# build of the editable wheel fetches setuptools), so a second ./scripts/demo.sh on a host
# without one failed here instead of serving its models at once.
stamp=.venv/.msflow-installed-$EXTRAS
installed=$(.venv/bin/python -I -c "import msflow, pathlib; print(pathlib.Path(msflow.__file__).resolve().parents[1])" \
  2>/dev/null || true)
if [ "$installed" != "$(pwd -P)" ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the project with extras [$EXTRAS]"
  .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
  touch "$stamp"
else
  echo "setup: the project is installed from here with extras [$EXTRAS] (pyproject.toml unchanged since)"
fi
.venv/bin/python -c "import torch, onnxruntime; print('setup: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
