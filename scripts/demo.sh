#!/usr/bin/env bash
# The main job on the embedded default: set up, serve the model store on port 8000 at once,
# and build the demo models in the background while it serves (scripts/build-demo.sh: a
# quick model per category first, then the full recipe). Categories appear in the server
# as they are exported; no restart.
#   MSFLOW_MODEL_STORE     model store to serve (default: model_store)
#   MSFLOW_DEMO_CATEGORIES categories to build (default: "brick grass gravel")
#   MSFLOW_PORT            port (default: 8000)
#   MSFLOW_ADMIN_API_KEYS  admin keys; without, admin routes open on loopback (MSFLOW_DEV_OPEN_ADMIN)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
export MSFLOW_MODEL_STORE=${MSFLOW_MODEL_STORE:-model_store}
# The console's admin view (thresholds) on this machine only: admin routes are closed unless
# an admin key is configured, and this development switch is refused off loopback.
if [ -z "${MSFLOW_ADMIN_API_KEYS:-}" ]; then export MSFLOW_DEV_OPEN_ADMIN=${MSFLOW_DEV_OPEN_ADMIN:-true}; fi
mkdir -p "$MSFLOW_MODEL_STORE"
# The builder in a process group of its own (job control on for this one start), so that
# leaving the demo stops the training under way too: killing the builder's shell alone left
# its `msflow train` running on, orphaned, into the run folder the next demo resumes.
set -m
./scripts/build-demo.sh </dev/null &
builder=$!
set +m
# A builder stopped mid-way cannot say so itself (SIGTERM ends its shell before any trap):
# the build is recorded as stopped, or the console and the inspect route (503 model_building)
# would say "being built" to whoever serves this store next.
stop_builder() {
  if kill -0 "$builder" 2>/dev/null; then
    kill -TERM -- -"$builder" 2>/dev/null || true
    .venv/bin/msflow build-status --store "$MSFLOW_MODEL_STORE" --state stopped >/dev/null 2>&1 || true
  fi
}
trap stop_builder EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
echo "demo: serving $MSFLOW_MODEL_STORE on http://127.0.0.1:${MSFLOW_PORT:-8000} (models appear as they are built)"
.venv/bin/msflow serve --port "${MSFLOW_PORT:-8000}"
