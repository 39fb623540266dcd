#!/usr/bin/env bash
# Creates the project venv (.venv) with the PyTorch that tch 0.26 links against, plus the
# data generators. Idempotent: a venv that already satisfies the pins is left alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BUTLER_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.butler-deps-v1"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==2.13.0" "numpy" "scikit-learn" "mnist1d" "safetensors"
touch "$stamp"
