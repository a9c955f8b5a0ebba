#!/usr/bin/env bash
# apt-install.sh TOOL PACKAGE...: install Debian packages for scripts/install-*.sh.
# Needs root, or passwordless sudo; refuses clearly where there is no apt-get.
set -euo pipefail
tool=$1; shift
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "$tool: run as root (or with passwordless sudo) to apt-get install $*" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$tool: no apt-get; install $* yourself" >&2
  exit 1
fi
echo "$tool: installing $*"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq "$@" >/dev/null
