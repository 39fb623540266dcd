#!/usr/bin/env bash
# Installs headless Chromium (Debian's `chromium` package) for the run report's browser check
# (scripts/report-check.sh, tests/report.rs). Idempotent: does nothing when a Chromium is on PATH.
set -euo pipefail
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "setup-chromium: not root; install Debian's chromium package (apt-get install chromium)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
