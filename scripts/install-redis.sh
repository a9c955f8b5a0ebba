#!/usr/bin/env bash
# Install redis-server, which the tests start on a free port of their own (tests/harness.py).
# Idempotent and quick: when redis-server runs, it only prints its version. Needs root, or
# passwordless sudo, to install (Debian/Ubuntu's redis-server package).
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "install-redis: $(redis-server --version | cut -d' ' -f1-3) already installed"
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-redis: run as root (or with passwordless sudo) to apt-get install redis-server" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-redis: no apt-get; install redis-server (>= 6.2) yourself" >&2
  exit 1
fi
echo "install-redis: installing the redis-server package"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq redis-server >/dev/null
redis-server --version
