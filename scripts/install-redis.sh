#!/usr/bin/env bash
# Install redis-server, which the tests start on a free port of their own (tests/harness.py).
# Idempotent and quick: when redis-server runs, it only prints its version. Needs root, or
# passwordless sudo, to install (Debian/Ubuntu's redis-server package).
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "install-redis: $(redis-server --version | cut -d' ' -f1-3) already installed"
  exit 0
fi
"$(dirname "$0")/apt-install.sh" install-redis redis-server
redis-server --version
