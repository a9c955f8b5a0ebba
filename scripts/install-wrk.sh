#!/usr/bin/env bash
# Install wrk, the compiled HTTP load generator the front-end benchmark uses for ceiling runs
# (python -m loadtests.frontend --client wrk; its test runs it). Idempotent and quick: when wrk
# is there, it only says so. Needs root, or passwordless sudo, to install (Debian's wrk).
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then
  echo "install-wrk: $(command -v wrk) already installed"
  exit 0
fi
"$(dirname "$0")/apt-install.sh" install-wrk wrk
command -v wrk
