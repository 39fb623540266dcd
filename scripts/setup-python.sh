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
# cudarc loads NCCL as "libnccl.so", a name the wheel does not ship (only libnccl.so.2): a link to it in a
# directory of the venv's own, found through the binaries' RUNPATH (build.rs) or LD_LIBRARY_PATH
# (scripts/env.sh). Made on every run, so a venv built before it gets it too.
nccl_shim() {
  local so
  so="$(ls "$venv"/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2 2>/dev/null | head -n 1)"
  if [ -n "$so" ]; then
    mkdir -p "$venv/nccl-shim"
    ln -sfn "$so" "$venv/nccl-shim/libnccl.so"
  fi
}
if [ -f "$stamp" ]; then nccl_shim; exit 0; fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# torchvision 0.26.0 is the release whose metadata requires torch==2.11.0.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==2.11.0" "torchvision==0.26.0" "numpy" "scikit-learn" "mnist1d" "safetensors"
nccl_shim
touch "$stamp"
