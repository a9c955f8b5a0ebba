#!/usr/bin/env bash
# Build the demo models into the model store while the server already runs (scripts/demo.sh).
# Two passes, so the first inspection answers within minutes on a 2-core CPU:
#   1. quick: every category with a short schedule (exported as version 1, no evaluation);
#   2. full:  every category with the default (paper) schedule, evaluated, exported as the
#             next version; the server swaps it in without a restart.
# Progress: lines prefixed "demo-build:" here (with the trainer's progress bars), and
# <store>/.build/status.json (msflow build-status), which GET /v1/models and the console
# show; each category appears in the console as soon as the server has loaded it.
#   MSFLOW_DEMO_CATEGORIES  categories (default "brick grass gravel")
#   MSFLOW_DEMO_FULL=0      stop after the quick pass
# Run again after an interruption, it goes on where it stopped: a run counts as trained only
# when `msflow train` finished it (train_log.jsonl ends with the trainer's "done" event); one
# it left unfinished (checkpoint.pt then holds only the best epoch so far) resumes from its
# last.pt with `msflow train --resume`, or trains anew where that cannot resume.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${MSFLOW_MODEL_STORE:-model_store}
CATEGORIES=${MSFLOW_DEMO_CATEGORIES:-"brick grass gravel"}
MSFLOW=.venv/bin/msflow

status() {  # status STAGE CATEGORY STATE [DETAIL]: a terminal line and <store>/.build/status.json
  echo "demo-build: [$(date -u +%H:%M:%S)] $1 $2: $3 ${4:-}"
  $MSFLOW build-status --store "$STORE" --stage "$1" --category "$2" --state "$3" --detail "${4:-}"
}
run_state() {  # run_state RUN: trained (msflow train finished it), resume (interrupted) or new
  if [ -f "$1/checkpoint.pt" ] && [ -f "$1/train_log.jsonl" ] \
      && tail -n 1 "$1/train_log.jsonl" | grep -q '"event": "done"'; then
    echo trained
  elif [ -f "$1/last.pt" ] && [ -f "$1/config.json" ]; then
    echo resume
  else
    echo new
  fi
}
train_run() {  # train_run RUN TRAIN-ARGS...: train into RUN unless that finished before
  local run=$1
  shift
  case $(run_state "$run") in
    trained) echo "demo-build: $run finished training before: not trained again" ;;
    resume)
      echo "demo-build: $run was interrupted: resuming its training (msflow train --resume)"
      $MSFLOW train "$@" --out "$run" --resume \
        || { echo "demo-build: $run cannot resume: training it anew"; $MSFLOW train "$@" --out "$run"; } ;;
    *) $MSFLOW train "$@" --out "$run" ;;
  esac
}
current=""  # "STAGE CATEGORY" being built, so a failure is recorded against it
trap 'rc=$?; if [ $rc -ne 0 ]; then [ -n "$current" ] && status $current failed "exit $rc"; $MSFLOW build-status --store "$STORE" --state failed; fi' EXIT

$MSFLOW build-status --store "$STORE" --state running
for category in $CATEGORIES; do
  ls "$STORE/$category"/*/manifest.json >/dev/null 2>&1 || status quick "$category" waiting
done
[ -f data/demo/brick/dataset.json ] || { echo "demo-build: writing the demo data set"; $MSFLOW demo-data --out data/demo >/dev/null; }

# Pass 1: a first model per category in about a minute each (lr 1e-3, 12 sub-epochs).
for category in $CATEGORIES; do
  if ls "$STORE/$category"/*/manifest.json >/dev/null 2>&1; then continue; fi
  current="quick $category"
  status quick "$category" training
  train_run "runs/demo-quick/$category" --data data/demo --category "$category" \
    --lr 1e-3 --meta-epochs 3 --sub-epochs 4 --warmup-meta-epochs 1 --decay-milestones 9
  $MSFLOW export --run "runs/demo-quick/$category" --store "$STORE" >/dev/null
  status quick "$category" served "quick model (12 sub-epochs); the full model follows"
done

current=""
if [ "${MSFLOW_DEMO_FULL:-1}" = "0" ]; then $MSFLOW build-status --store "$STORE" --state done; exit 0; fi
# Pass 2: the default recipe, evaluated (report, pictures), replacing the quick model.
for category in $CATEGORIES; do
  run=runs/demo/$category
  if [ -f "$run/report.json" ] && [ -f "$STORE/$category/.full-exported" ]; then continue; fi
  current="full $category"
  status full "$category" training "default recipe; the quick model keeps serving"
  train_run "$run" --data data/demo --category "$category"
  status full "$category" evaluating
  $MSFLOW eval --run "$run" | sed 's/^/demo-build:   /'
  $MSFLOW export --run "$run" --store "$STORE" >/dev/null
  touch "$STORE/$category/.full-exported"
  status full "$category" served "full model (default recipe), evaluated"
done
current=""
$MSFLOW build-status --store "$STORE" --state done
echo "demo-build: done"
