#!/usr/bin/env bash
# apt-install.sh TOOL PACKAGE...: install Debian packages for scripts/install-*.sh.
# Needs root, or passwordless sudo; refuses clearly where there is no apt-get.
set -euo pipefail
tool=$1; shift
. "$(dirname "$0")/as-root.sh"
as_root "$tool" "to apt-get install $*"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$tool: no apt-get; install $* yourself" >&2
  exit 1
fi
echo "$tool: installing $*"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq "$@" >/dev/null
