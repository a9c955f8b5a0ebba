#!/usr/bin/env bash
# Install the headless browser of tests/test_console_browser.py: Debian's `chromium` package
# (driven by Playwright for Python, the `test` extra). Playwright's own browser download
# (`playwright install`) is never used.
#
# Idempotent and quick: when the browser already runs, it only prints its version (no apt,
# no network). Needs root, or passwordless sudo, to install.
set -euo pipefail
CHROMIUM=${MSFLOW_CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
  echo "install-browser: $("$CHROMIUM" --version 2>/dev/null) already installed at $CHROMIUM"
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-browser: run as root (or with passwordless sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get; install Chromium yourself and set MSFLOW_CHROMIUM=/path/to/chromium" >&2
  exit 1
fi

echo "install-browser: installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
"$CHROMIUM" --version 2>/dev/null
