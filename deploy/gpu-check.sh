#!/usr/bin/env bash
# GPU check for a CUDA host: build a demo model, check every GPU engine against ONNX Runtime
# on CPU, benchmark all engines, and write one report (JSON + Markdown summary).
#
#   deploy/gpu-check.sh                          # demo data -> train -> export (+TensorRT) -> parity -> bench
#   GPU_CHECK_MODEL=model_store/grass deploy/gpu-check.sh   # reuse an exported version instead
#   OUT=/tmp/report deploy/gpu-check.sh          # where the report goes (default ./gpu-check-report)
#
# Output: $OUT/gpu-check-report.json (everything: host, steps with durations, TensorRT
# status, parity, benchmark) and $OUT/gpu-check-report.md (the summary), plus raw/ with each
# step's log and JSON. Degrades cleanly: without TensorRT (or if the plan fails to build) the
# report says so and the other engines (ONNX CPU/CUDA, torch CUDA fp16, CUDA graphs) are still
# checked and measured. Exit status: 0 when every step and every parity check passed.
#
# Knobs (environment): PYTHON, GPU_CHECK_MODEL, GPU_CHECK_WORK (scratch folder, default a
# new mktemp dir), GPU_CHECK_CATEGORY (grass), GPU_CHECK_INPUT_SIZE (256),
# GPU_CHECK_META_EPOCHS (4), GPU_CHECK_BATCH_SIZES ("1 8 32"), GPU_CHECK_REPEATS (10),
# GPU_CHECK_PARITY_IMAGES (24), GPU_CHECK_TENSORRT (auto|0: skip the plan),
# GPU_CHECK_LOAD_USERS (32), GPU_CHECK_LOAD_DURATION (30s), GPU_CHECK_LOAD_IMAGES (demo test
# images of the model's category; a folder or glob), GPU_CHECK_WINDOW_S (10: each front-end
# benchmark window), GPU_CHECK_FRONTENDS ("2 4 8 16": front-end process counts, each up to
# half the cores), GPU_CHECK_DEADLINE_S (none: optional steps that would start later than this
# many seconds or more after the start are skipped, so the report is written inside a caller's limit).
# GPU_CHECK_PROFILE=quick sets smaller defaults for all of these (a lent machine's ten minutes:
# deploy/gpu-check-device.sh), each still overridable; full (the default) is the above.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

OUT_DIR="${OUT:-./gpu-check-report}"
mkdir -p "$OUT_DIR/raw"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
RAW="$OUT_DIR/raw"

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi

PROFILE="${GPU_CHECK_PROFILE:-full}"
case $PROFILE in
  full) d_epochs=4 d_repeats=10 d_parity=24 d_load=30s d_window=10 d_frontends="2 4 8 16" d_link_s=5 d_link_rounds=2 ;;
  quick) d_epochs=2 d_repeats=5 d_parity=12 d_load=15s d_window=4 d_frontends="2 8" d_link_s=2 d_link_rounds=1 ;;
  *) echo "GPU_CHECK_PROFILE: full or quick, not $PROFILE" >&2; exit 2 ;;
esac
MODEL="${GPU_CHECK_MODEL:-}"
WORK="${GPU_CHECK_WORK:-}"
CATEGORY="${GPU_CHECK_CATEGORY:-grass}"
INPUT_SIZE="${GPU_CHECK_INPUT_SIZE:-256}"
META_EPOCHS="${GPU_CHECK_META_EPOCHS:-$d_epochs}"
BATCH_SIZES="${GPU_CHECK_BATCH_SIZES:-1 8 32}"
REPEATS="${GPU_CHECK_REPEATS:-$d_repeats}"
PARITY_IMAGES="${GPU_CHECK_PARITY_IMAGES:-$d_parity}"
WANT_TENSORRT="${GPU_CHECK_TENSORRT:-auto}"
LOAD_USERS="${GPU_CHECK_LOAD_USERS:-32}"
LOAD_DURATION="${GPU_CHECK_LOAD_DURATION:-$d_load}"
LOAD_IMAGES="${GPU_CHECK_LOAD_IMAGES:-}"
WINDOW_S="${GPU_CHECK_WINDOW_S:-$d_window}"
FRONTENDS="${GPU_CHECK_FRONTENDS:-$d_frontends}"
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-}"
STARTED=$(date +%s)

STEPS="$RAW/steps.tsv"
printf 'step\trc\tstart\tend\tseconds\trequired\tlog\n' > "$STEPS"
SKIPPED="$RAW/skipped.tsv"
printf 'step\treason\n' > "$SKIPPED"
FAILED=0
TENSORRT_STATUS="not attempted"

ts() { date -u +%Y-%m-%dT%H:%M:%SZ; }
log() { echo "[$(ts)] $*"; }
trap 'log "unexpected error at line $LINENO (exit $?)"' ERR

# skip NAME REASON: a step not run, listed in the report with why.
skip() {
  log "--- $1 skipped: $2"
  printf '%s\t%s\n' "$1" "$2" >> "$SKIPPED"
}

# step NAME REQUIRED(0|1) CMD...: run CMD, tee its output to raw/NAME.log, record rc and
# duration; a failed required step marks the check failed but later steps still run. An
# optional step that would start past GPU_CHECK_DEADLINE_S is skipped (returns 0).
step() {
  local name=$1 required=$2 rc start end
  shift 2
  if [[ -n $DEADLINE_S && $required == 0 ]] && (( $(date +%s) - STARTED >= DEADLINE_S )); then
    skip "$name" "past the deadline (GPU_CHECK_DEADLINE_S=$DEADLINE_S)"
    return 0
  fi
  start=$(date +%s.%N)
  log ">>> $name: $*"
  set +e
  "$@" 2>&1 | tee "$RAW/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$start" "$end" "$seconds" "$required" "raw/$name.log" >> "$STEPS"
  log "<<< $name: exit $rc after ${seconds}s"
  if [[ $rc -ne 0 && $required == 1 ]]; then FAILED=1; fi
  return "$rc"
}

if [[ -z "$MODEL" && -z "$WORK" ]]; then WORK="$(mktemp -d -t msflow-gpu-check.XXXXXX)"; fi
log "MSFlow GPU check ($PROFILE): repo $REPO_ROOT, python $PY, report in $OUT_DIR${WORK:+, scratch in $WORK}"

# 0. the host
step environment 1 "$PY" - "$RAW/environment.json" <<'EOF' || true
import json, platform, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), cuda_runtime=torch.version.cuda)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu_name=torch.cuda.get_device_name(), gpu_capability=f"{major}.{minor}")
except Exception as e:
    info["torch_error"] = repr(e)
try:
    import onnxruntime as ort
    info.update(onnxruntime=ort.__version__, onnxruntime_providers=ort.get_available_providers())
except Exception as e:
    info["onnxruntime_error"] = repr(e)
try:
    import tensorrt
    info["tensorrt"] = tensorrt.__version__
except Exception as e:
    info["tensorrt"] = None
    info["tensorrt_error"] = repr(e)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=30).stdout.strip()
except Exception as e:
    info["nvidia_smi"] = f"unavailable: {e}"
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
EOF

HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
HAS_TRT=$("$PY" -c 'import tensorrt' >/dev/null 2>&1 && echo 1 || echo 0)
DEVICE=cpu
if [[ $HAS_CUDA == 1 ]]; then DEVICE=cuda; else log "WARNING: no CUDA GPU visible: only CPU engines can be checked"; fi

# 1. a model: demo data -> brief training -> export (with a TensorRT plan when possible)
if [[ -z "$MODEL" ]]; then
  step demo_data 1 "$PY" -m msflow.cli demo-data --out "$WORK/demo" --n-train 48 --n-test-good 8 \
    --n-test-defect 12 || true
  step train 1 "$PY" -m msflow.cli train --data "$WORK/demo" --category "$CATEGORY" --out "$WORK/runs/$CATEGORY" \
    --input-size "$INPUT_SIZE" --meta-epochs "$META_EPOCHS" --sub-epochs 2 --warmup-meta-epochs 1 \
    --lr 1e-3 --holdout-fraction 0.2 --device "$DEVICE" || true
  exported=0
  if [[ $WANT_TENSORRT != 0 && $HAS_TRT == 1 && $HAS_CUDA == 1 ]]; then
    # A step skipped past the deadline also returns 0: exported only when a version was written.
    if step export_tensorrt 0 "$PY" -m msflow.cli export --run "$WORK/runs/$CATEGORY" --store "$WORK/store" \
        --validation "$WORK/demo" --tensorrt --trt-min-batch 1 --trt-opt-batch 8 --trt-max-batch 32 \
        && compgen -G "$WORK/store/$CATEGORY/*/manifest.json" >/dev/null; then
      exported=1
      TENSORRT_STATUS="plan built"
    elif grep -q "^export_tensorrt"$'\t' "$SKIPPED"; then
      TENSORRT_STATUS="skipped: past the deadline (GPU_CHECK_DEADLINE_S=$DEADLINE_S); exported without TensorRT"
    else
      TENSORRT_STATUS="plan build FAILED (see raw/export_tensorrt.log); exported without TensorRT"
    fi
  elif [[ $WANT_TENSORRT == 0 ]]; then
    TENSORRT_STATUS="skipped (GPU_CHECK_TENSORRT=0)"
  elif [[ $HAS_CUDA != 1 ]]; then
    TENSORRT_STATUS="not available: no CUDA GPU"
  else
    TENSORRT_STATUS="not available: the tensorrt Python package is not installed (pip install tensorrt)"
  fi
  if [[ $exported == 0 ]]; then
    step export 1 "$PY" -m msflow.cli export --run "$WORK/runs/$CATEGORY" --store "$WORK/store" \
      --validation "$WORK/demo" || true
  fi
  MODEL="$WORK/store/$CATEGORY"
else
  log "using the existing model $MODEL (steps demo_data/train/export skipped)"
  TENSORRT_STATUS=$("$PY" - "$MODEL" <<'EOF' 2>/dev/null || echo "unknown (cannot read the manifest)"
import sys
from msflow.engine_catalog import resolve_version
from models.manifest import Manifest
m = Manifest.read(resolve_version(sys.argv[1]))
print(f"existing plan (TensorRT {m.tensorrt.tensorrt_version}, {m.tensorrt.gpu_name})" if m.tensorrt
      else "the existing version has no TensorRT plan")
EOF
)
  if [[ $HAS_TRT != 1 ]]; then TENSORRT_STATUS="$TENSORRT_STATUS; tensorrt is not installed here"; fi
fi
log "TensorRT: $TENSORRT_STATUS"

# 2. parity of every available engine against ONNX Runtime on CPU (real demo images)
step parity 1 "$PY" -m msflow.parity --model "$MODEL" --out "$RAW/parity.json" --images "$PARITY_IMAGES" || true

# 3. benchmark every engine available here
# shellcheck disable=SC2086  # BATCH_SIZES is a list of numbers
step bench 1 "$PY" -m msflow.cli bench --model "$MODEL" --batch-sizes $BATCH_SIZES --repeats "$REPEATS" \
  --out "$RAW/bench.json" || true

# 3b. the whole path: `msflow serve` on this host's best engine, a headless Locust run against it
if [[ -z "$LOAD_IMAGES" ]]; then
  if [[ -n "$WORK" && -d "$WORK/demo/$CATEGORY/test" ]]; then LOAD_IMAGES="$WORK/demo/$CATEGORY/test"
  else LOAD_IMAGES="data/demo/*/test/*/*.png"; fi
fi
if ! "$PY" -c 'import locust' >/dev/null 2>&1; then
  skip loadtest "Locust is not installed (the front-end benchmarks below drive the server with their own client)"
elif [[ ! -d $LOAD_IMAGES ]] && ! compgen -G "$LOAD_IMAGES" >/dev/null; then
  skip loadtest "no images at $LOAD_IMAGES (GPU_CHECK_LOAD_IMAGES)"
else
  step loadtest 0 "$PY" -m loadtests.run --serve --store "$(dirname "$MODEL")" --users "$LOAD_USERS" \
    --spawn-rate "$LOAD_USERS" --duration "$LOAD_DURATION" --images "$LOAD_IMAGES" --out "$RAW/load" \
    --fail-on-error || true
fi

# The engine the end-to-end front-end runs serve with: the host's best on its GPU (TensorRT's
# plan or ONNX Runtime's CUDA provider, as `auto` picks them; else PyTorch on CUDA), ONNX
# Runtime on a host without a GPU (there the CPU spent outside the engine is split from the
# engine's own). The benchmark's server is otherwise pinned to the CPU.
if [[ $HAS_CUDA == 1 ]]; then
  HAS_ORT_CUDA=$("$PY" -c 'import onnxruntime as o; print(int("CUDAExecutionProvider" in o.get_available_providers()))' \
    2>/dev/null || echo 0)
  if [[ $HAS_TRT == 1 || $HAS_ORT_CUDA == 1 ]]; then SERVE=(--engine auto --device cuda)
  else SERVE=(--engine torch --device cuda); fi
else
  SERVE=(--engine onnx --device cpu)
fi
# The client: wrk where installed (compiled, a thirtieth of the CPU per request; a Python client
# caps near a thousand requests a second per process, too few to load many front ends), else
# the benchmark's httpx loop. The real engine on a CPU host needs the httpx loop (its split by
# batch size reads every answer).
if command -v wrk >/dev/null 2>&1; then WRK=(--client wrk); else WRK=(); fi
if [[ " ${SERVE[*]} " == *" --device cpu "* ]]; then SERVE_WRK=(); else SERVE_WRK=("${WRK[@]}"); fi
log "front end, end to end: ${SERVE[*]}; client: ${WRK[*]:-httpx (no wrk here)}"
FRONT=("$PY" -m loadtests.frontend --store "$(dirname "$MODEL")" --category "$(basename "$MODEL")"
       --seconds "$WINDOW_S")

# 3c. the front end on this host's cores: the null engine (server CPU per image, images/s per
# input kind, where the CPU goes), then the same inputs end to end on the host's best engine
step frontend 0 "${FRONT[@]}" "${WRK[@]}" --concurrency 32 --decode-threads "$(nproc)" --out "$RAW/frontend" || true
step frontend-engine 0 "${FRONT[@]}" "${SERVE[@]}" "${SERVE_WRK[@]}" --concurrency 32 --decode-threads "$(nproc)" --no-profile \
  --out "$RAW/frontend-engine" || true
if [[ $PROFILE == full ]]; then
  # ... with every image's work in the decode threads instead of the event loop (small
  # requests run on the loop by default: less CPU per image, but one core per process)
  step frontend-threads 0 "${FRONT[@]}" "${WRK[@]}" --concurrency 32 --decode-threads "$(nproc)" --loop-work-pixels 0 \
    --kinds jpeg256-none png256-inline --no-profile --out "$RAW/frontend-threads" || true
  # ... with a good part of the category instead of the texture photograph (which a model of
  # the category finds defective all over, so every answer carries a whole-image region)
  shopt -s nullglob
  goods=("${WORK:-.}/demo/$CATEGORY/test/good/"*.png data/demo/"$CATEGORY"/test/good/*.png)
  shopt -u nullglob
  GOOD_PART=${goods[0]:-}
  if [[ -n "$GOOD_PART" ]]; then
    step frontend-engine-good 0 "${FRONT[@]}" "${SERVE[@]}" "${SERVE_WRK[@]}" --concurrency 32 --decode-threads "$(nproc)" \
      --no-profile --image "$GOOD_PART" --out "$RAW/frontend-engine-good" || true
  fi
else
  skip frontend-threads "quick profile"
  skip frontend-engine-good "quick profile"
fi
# ... and in the states a deployment reaches: a full review store (a busy line fills the default
# 10,000 items in minutes), and Redis with every request's bytes distinct (result-cache misses)
step frontend-review-full 0 "${FRONT[@]}" "${WRK[@]}" --concurrency 32 --decode-threads "$(nproc)" --review-items 10000 \
  --kinds jpeg256-none png256-inline --no-profile --out "$RAW/frontend-review-full" || true
if command -v redis-server >/dev/null; then
  step frontend-redis 0 "${FRONT[@]}" --concurrency 32 --decode-threads "$(nproc)" --redis --distinct \
    --kinds jpeg256-none png256-inline --no-profile --out "$RAW/frontend-redis" || true
else
  skip frontend-redis "no redis-server on this host"
fi
# ... and whether this host's CPU makes the work after an ISA-L call pay for the vector registers
# ISA-L leaves dirty (service/pipeline/deflate.py clears them; the log shows the three columns)
if [[ $PROFILE == full ]]; then step vector-state 0 "$PY" -m loadtests.vector_state --rounds 2 || true
else skip vector-state "quick profile"; fi
# 3d. more than one process feeding one engine (MSFLOW_API_PROCESSES): the same benchmark with
# each count of front-end processes in GPU_CHECK_FRONTENDS (up to half the cores), null engine,
# then the host's best engine; server CPU is summed over the supervisor, its front ends and the
# engine process
for n in $FRONTENDS; do
  if (( n > $(nproc) / 2 )); then skip "frontend-p$n" "more front ends than half of $(nproc) cores"; continue; fi
  step "frontend-p$n" 0 "${FRONT[@]}" "${WRK[@]}" --api-processes "$n" --concurrency $((32 * n)) --decode-threads 4 \
    --kinds jpeg256-none jpeg2048-none --no-profile --out "$RAW/frontend-p$n" || true
  # the floor under it: the same work over n separate single-process servers, no link between them
  step "frontend-s$n" 0 "${FRONT[@]}" "${WRK[@]}" --servers "$n" --concurrency $((32 * n)) --decode-threads 4 \
    --kinds jpeg256-none jpeg2048-none --no-profile --out "$RAW/frontend-s$n" || true
  step "frontend-engine-p$n" 0 "${FRONT[@]}" "${SERVE[@]}" "${SERVE_WRK[@]}" --api-processes "$n" --concurrency $((32 * n)) \
    --decode-threads 4 --kinds jpeg256-none --no-profile --out "$RAW/frontend-engine-p$n" || true
done
# ... and the link between them alone (no HTTP, no decode): what one image costs to cross it on
# this host's cores, against a local batcher, at 1, 8 and 64 in flight
step engine-link 0 "$PY" -m loadtests.engine_link --store "$(dirname "$MODEL")" --category "$(basename "$MODEL")" \
  --in-flight 1 8 64 --seconds "$d_link_s" --rounds "$d_link_rounds" --out "$RAW/engine-link" || true

# 4. one report: JSON with everything + a Markdown summary
step report 1 "$PY" - "$OUT_DIR" "$TENSORRT_STATUS" "$MODEL" "$FAILED" <<'EOF' || true
import csv, json, sys
from pathlib import Path

out, trt_status, model, failed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
raw = out / "raw"

def load(name):
    p = raw / name
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError as e:
        return {"error": f"unreadable {name}: {e}"}

steps = list(csv.DictReader((raw / "steps.tsv").open(), delimiter="\t"))
for s in steps:
    s["rc"], s["seconds"] = int(s["rc"]), float(s["seconds"])
skipped = list(csv.DictReader((raw / "skipped.tsv").open(), delimiter="\t")) if (raw / "skipped.tsv").is_file() else []
env, parity, bench = load("environment.json"), load("parity.json"), load("bench.json")
cuda = bool(env and env.get("cuda"))
gpu_checked = [e for e in (parity or {}).get("engines_checked", []) if e not in ("onnxruntime-cpu", "torch-cpu")]
passed = (not failed and all(s["rc"] == 0 for s in steps if s["required"] == "1")
          and bool(parity and parity.get("passed")) and bench is not None and bool(gpu_checked))
if passed:
    verdict = "PASSED"
elif not cuda:
    verdict = "INCOMPLETE: no CUDA GPU visible, only the CPU engines were checked"
elif not gpu_checked:
    verdict = "FAILED: no GPU engine could be checked (see the skipped reasons below)"
else:
    verdict = "FAILED"
report = {"passed": passed, "verdict": verdict, "cuda": cuda, "gpu_engines_checked": gpu_checked, "model": model,
          "tensorrt": trt_status, "environment": env, "steps": steps, "skipped": skipped,
          "parity": parity, "bench": bench}
(out / "gpu-check-report.json").write_text(json.dumps(report, indent=2, default=str))

md = ["# MSFlow GPU check", "", f"**Result: {verdict}**", ""]
if env:
    md += [f"- GPU: {env.get('gpu_name', 'none')} (capability {env.get('gpu_capability', '-')}), "
           f"driver/nvidia-smi: {env.get('nvidia_smi', '-')}",
           f"- torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), onnxruntime {env.get('onnxruntime')} "
           f"{env.get('onnxruntime_providers')}, TensorRT {env.get('tensorrt') or 'not installed'}"]
md += [f"- Model: `{model}`", f"- TensorRT plan: {trt_status}", "", "## Steps", "",
       "| step | exit | seconds |", "|---|---:|---:|"]
md += [f"| {s['step']} | {s['rc']} | {s['seconds']:.1f} |" for s in steps]
md += [f"| {s['step']} | skipped: {s['reason']} | |" for s in skipped]
md += ["", "## Parity against onnxruntime-cpu", ""]
if parity and "engines" in parity:
    md += [f"{parity['images']['count']} real demo images {parity['images']['labels']}; tolerances by precision: "
           f"`{json.dumps(parity['tolerances'])}` (score: normalised score; map: fraction of the heatmap range).", "",
           "| engine | precision | result | score max abs | normalised score | map max (of range) | map p99 (of range) | verdict flips |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, e in parity["engines"].items():
        if "metrics" not in e:
            md.append(f"| {name} | {e.get('precision', '')} | {e['status']}: {e.get('reason', '')} | | | | | |")
            continue
        m = e["metrics"]
        md.append(f"| {name} | {e['precision']} | {'pass' if e['passed'] else 'FAIL: ' + '; '.join(e['failures'])} "
                  f"| {m['score_max_abs']:.3g} | {m['score_normalised_max_abs']:.4f} | {m['map_max_abs']:.3g} "
                  f"({m['map_max_of_range']:.2%}) | {m['map_p99_of_range']:.2%} | {m['verdict_flips']} |")
else:
    md.append("parity did not produce a report (see raw/parity.log)")
load_md = raw / "load" / "summary.md"
if load_md.is_file():
    md += ["", "## End to end (msflow serve + Locust)", "", load_md.read_text()]
for summary in sorted(raw.glob("frontend*/summary.md")):
    md += ["", f"## Front end: {summary.parent.name}", "", summary.read_text()]
link_md = raw / "engine-link" / "summary.md"
if link_md.is_file():
    md += ["", "## The engine link alone", "", link_md.read_text()]
md += ["", "## Benchmark", ""]
if bench and "results" in bench:
    md += [f"input {bench['model']['input_size']} px; {bench['settings']['input']}; "
           f"{bench['settings']['repeats']} timed runs after {bench['settings']['warmup']} warm-up runs; "
           f"CPU: {bench['machine']['cpu_model']} ({bench['machine']['usable_cores']} cores)", "",
           "| engine | batch | images/s | p50 ms | p95 ms | RSS peak MiB | GPU peak MiB (torch) | GPU used MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v, spec: "-" if v is None else format(v, spec)
    for r in bench["results"]:
        md.append(f"| {r['engine']} | {r['batch']} | {r['images_per_s']:.1f} | {r['latency_ms']['p50']:.2f} | "
                  f"{r['latency_ms']['p95']:.2f} | {f(r['rss_peak_mib'], '.0f')} | {f(r.get('gpu_peak_mib'), '.0f')} | "
                  f"{f(r.get('gpu_used_mib'), '.0f')} |")
    for name, st in bench["engines"].items():
        if st["status"] != "ok":
            md.append(f"\n- {name}: {st['status']}: {st.get('reason')}")
    ratio = bench.get("ratio_onnxruntime_cpu_over_torch_cpu") or {}
    if ratio:
        md.append("\nonnxruntime-cpu / torch-cpu images/s: " + ", ".join(f"batch {b}: {v:.2f}x" for b, v in ratio.items()))
    md += ["", f"Memory: {bench['memory_method']}"]
else:
    md.append("the benchmark did not produce a report (see raw/bench.log)")
(out / "gpu-check-report.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
print(f"\nreport: {out / 'gpu-check-report.json'} and {out / 'gpu-check-report.md'}")
sys.exit(0 if passed else 1)
EOF
REPORT_RC=$(awk -F'\t' '$1 == "report" { print $2 }' "$STEPS")

if [[ -n "$WORK" ]]; then log "scratch folder kept: $WORK"; fi
if [[ $FAILED != 0 || ${REPORT_RC:-1} != 0 ]]; then
  log "GPU check did not pass: see $OUT_DIR/gpu-check-report.md"
  exit 1
fi
log "GPU check passed: $OUT_DIR/gpu-check-report.md"
