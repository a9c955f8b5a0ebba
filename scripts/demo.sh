#!/usr/bin/env bash
# The main job on the embedded default: set up, build the demo models when the model store
# is empty (demo textures -> train -> evaluate -> export), then serve them on port 8000.
#   MSFLOW_MODEL_STORE    model store to serve (default: model_store)
#   MSFLOW_DEMO_CATEGORIES categories to build (default: "brick grass gravel")
#   MSFLOW_PORT           port (default: 8000)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
export MSFLOW_MODEL_STORE=${MSFLOW_MODEL_STORE:-model_store}
CATEGORIES=${MSFLOW_DEMO_CATEGORIES:-"brick grass gravel"}
MSFLOW=.venv/bin/msflow

if ! ls "$MSFLOW_MODEL_STORE"/*/*/manifest.json >/dev/null 2>&1; then
  echo "demo: $MSFLOW_MODEL_STORE is empty: building the demo models ($CATEGORIES)"
  [ -d data/demo ] || $MSFLOW demo-data --out data/demo
  for category in $CATEGORIES; do
    run=runs/demo/$category
    if [ ! -f "$run/checkpoint.pt" ]; then
      $MSFLOW train --data data/demo --category "$category" --out "$run"
    fi
    $MSFLOW eval --run "$run"
    $MSFLOW export --run "$run" --store "$MSFLOW_MODEL_STORE"
  done
fi
echo "demo: serving $MSFLOW_MODEL_STORE on http://127.0.0.1:${MSFLOW_PORT:-8000}"
exec $MSFLOW serve --port "${MSFLOW_PORT:-8000}"
