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

# Elsewhere than Debian: install Chromium yourself and set MSFLOW_CHROMIUM=/path/to/chromium.
"$(dirname "$0")/apt-install.sh" install-browser chromium
"$CHROMIUM" --version 2>/dev/null
