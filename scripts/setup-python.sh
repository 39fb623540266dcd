#!/usr/bin/env bash
# Creates the project venv (.venv) with the PyTorch that tch 0.24 links against, plus the
# data generators and torchvision (for bench/augment_vs_torchvision.py). Idempotent: a venv that
# already satisfies the pins is left alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BUTLER_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
# Bump the version in this name whenever the package list changes, so existing venvs pick it up.
stamp="$venv/.butler-deps-v3"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# torchvision 0.26.0 is the release whose metadata requires torch==2.11.0.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==2.11.0" "torchvision==0.26.0" "numpy" "scikit-learn" "mnist1d" "safetensors"
touch "$stamp"
