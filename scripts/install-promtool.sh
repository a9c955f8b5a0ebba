#!/usr/bin/env bash
# Install promtool, Prometheus's rule checker: the tests run `promtool check config`,
# `promtool check rules` and `promtool test rules` on deploy/prometheus/ (test_alert_rules.py).
# Idempotent and quick: when promtool is there, it only says so. It takes the binary out of
# Debian's prometheus package without installing the package (no server, no service user);
# needs root, or passwordless sudo, to write /usr/local/bin (or set PROMTOOL_DIR).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  echo "install-promtool: $(command -v promtool) already installed"
  exit 0
fi
dest=${PROMTOOL_DIR:-/usr/local/bin}
SUDO=()
if [ ! -w "$dest" ]; then
  . "$(dirname "$0")/as-root.sh"
  as_root install-promtool "to write $dest, or set PROMTOOL_DIR to a folder on PATH"
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-promtool: no apt-get; install promtool (Prometheus 2.x or 3.x) yourself" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "install-promtool: taking promtool from Debian's prometheus package"
(cd "$work" && apt-get download prometheus >/dev/null 2>&1) || {
  "${SUDO[@]}" apt-get update -qq
  (cd "$work" && apt-get download prometheus >/dev/null)
}
dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
"${SUDO[@]}" install -m 0755 "$work/x/usr/bin/promtool" "$dest/promtool"
"$dest/promtool" --version | head -1
