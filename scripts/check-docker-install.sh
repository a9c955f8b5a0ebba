#!/usr/bin/env bash
# Replays the Dockerfile's install steps (VARIANT=cpu) in a fresh virtual environment, for
# machines without a Docker engine. Same commands, same order, same build context (only
# pyproject.toml, README.md and the three packages), with one difference: torch is the
# local pin (`torch==2.13.0`, as scripts/setup.sh installs it) instead of the PyTorch CPU
# index. Then, from a folder without sources (the installed copy must stand on its own):
# `msflow --help`, `msflow serve --help`, an import of the service and an app built from it.
#
#   scripts/check-docker-install.sh          # prints PASS or FAIL; exit status 0 or 1
#   KEEP=1 scripts/check-docker-install.sh   # keep the temporary folder to look at
#
# Keep in sync with the Dockerfile's `builder` stage.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${MSFLOW_TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d /tmp/msflow-docker-check.XXXXXX)
LOG=$WORK/install.log

cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "check-docker-install: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

step() { echo "check-docker-install: $*"; }
fail() {
  echo "check-docker-install: FAIL: $*"
  if [ -s "$LOG" ]; then echo "--- last lines of the install log ---"; tail -n 30 "$LOG"; fi
  exit 1
}
run() { "$@" >>"$LOG" 2>&1; }

export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

step "fresh virtual environment in $WORK/venv ($($PYTHON --version 2>&1))"
run "$PYTHON" -m venv "$WORK/venv" || fail "python -m venv"
PY=$WORK/venv/bin/python
run "$PY" -m pip install --upgrade pip || fail "pip install --upgrade pip"

# 1. torch, pinned (the image: --index-url https://download.pytorch.org/whl/cpu).
step "1/3 $TORCH_SPEC"
run "$PY" -m pip install "$TORCH_SPEC" || fail "pip install $TORCH_SPEC"

# 2. The dependencies, from pyproject.toml and README.md with empty stand-in packages.
step "2/3 the project's dependencies (stand-in packages)"
SRC=$WORK/src
mkdir -p "$SRC"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$SRC/" || fail "pyproject.toml and README.md must exist (the image copies them)"
( cd "$SRC" \
  && mkdir -p models service msflow \
  && touch models/__init__.py service/__init__.py msflow/__init__.py \
  && "$PY" -m pip install . ) >>"$LOG" 2>&1 || fail "pip install . (dependencies)"

# 3. The sources, as COPY brings them (.dockerignore drops __pycache__), non-editable.
step "3/3 the sources (non-editable)"
for pkg in models service msflow; do
  rm -rf "${SRC:?}/$pkg"
  tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' -cf - "$pkg" | tar -C "$SRC" -xf - || fail "copy $pkg"
done
( cd "$SRC" && "$PY" -m pip install --no-deps --force-reinstall . ) >>"$LOG" 2>&1 \
  || fail "pip install --no-deps --force-reinstall ."

# Checks, from an empty folder so that nothing is imported from the repository.
mkdir -p "$WORK/home" && cd "$WORK/home"
step "msflow --help"
run "$WORK/venv/bin/msflow" --help || fail "msflow --help"
run "$WORK/venv/bin/msflow" serve --help || fail "msflow serve --help"

step "import the service and build its app"
"$PY" - "$ROOT" >>"$LOG" 2>&1 <<'EOF' || fail "importing the installed service"
import pathlib
import sys
import tempfile

import models, msflow.cli, service  # noqa: E401
import onnxruntime
import torch

root = pathlib.Path(sys.argv[1]).resolve()
for mod in (models, msflow.cli, service):
    path = pathlib.Path(mod.__file__).resolve()
    assert root not in path.parents, f"{mod.__name__} imported from the repository ({path}), not the install"
    print(mod.__name__, "->", path)

# Every module of the repository's packages is in the install (catches sub-packages that
# pyproject's package list would leave out).
for pkg in ("models", "service", "msflow"):
    site = pathlib.Path(sys.modules[pkg].__file__).parent
    wanted = {p.relative_to(root / pkg) for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    have = {p.relative_to(site) for p in site.rglob("*.py")}
    assert wanted <= have, f"{pkg}: not installed: {sorted(map(str, wanted - have))}"

from service.api.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
import service.server  # noqa: E402,F401

app = create_app(Settings(model_store=tempfile.mkdtemp()))
paths = {getattr(r, "path", None) for r in app.routes}
assert {"/healthz", "/readyz", "/metrics", "/v1/inspect/{category}"} <= paths, paths
print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
EOF
sed -n 's/^/  /p' "$LOG" | grep -E '^  (models|msflow\.cli|service|torch) ' || true

echo "check-docker-install: PASS"
