#!/usr/bin/env bash
# Installs everything butler needs on a fresh machine, idempotently: the Python venv with the PyTorch that
# tch links against and the data generators. protoc is vendored by the build (protoc-bin-vendored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup-python.sh
