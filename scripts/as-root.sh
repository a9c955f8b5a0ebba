# Sourced by scripts/apt-install.sh and scripts/install-promtool.sh. as_root TOOL WHY sets the
# array SUDO to what runs a command as root here (nothing for root, `sudo -n` where sudo needs
# no password), or exits saying WHY root is needed.
as_root() {
  SUDO=()
  if [ "$(id -u)" -eq 0 ]; then
    return 0
  fi
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
    return 0
  fi
  echo "$1: run as root (or with passwordless sudo) $2" >&2
  exit 1
}
