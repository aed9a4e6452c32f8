#!/usr/bin/env bash
# Install what the UI tests drive from outside Python: Debian's headless-capable chromium
# (web view screenshot) and tmux (the dashboard in a real terminal). Idempotent: when both
# are on PATH it returns at once without touching apt.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "browser.sh: installing ${missing[*]}" >&2
($SUDO apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
     "${missing[@]}") >&2
