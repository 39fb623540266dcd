# Sourced by the project's scripts: points the tch build and the run-time loader at the venv's libtorch.
# shellcheck shell=bash
BUTLER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BUTLER_ROOT
export BUTLER_VENV="${BUTLER_VENV:-$BUTLER_ROOT/.venv}"
export BUTLER_PYTHON="$BUTLER_VENV/bin/python"
export LIBTORCH_USE_PYTORCH=1
export PATH="$BUTLER_VENV/bin:$PATH"
_torch_lib="$(ls -d "$BUTLER_VENV"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n 1)"
if [ -n "$_torch_lib" ]; then
  export LD_LIBRARY_PATH="$_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The libnccl.so name cudarc loads (scripts/setup-python.sh makes it).
if [ -d "$BUTLER_VENV/nccl-shim" ]; then
  export LD_LIBRARY_PATH="$BUTLER_VENV/nccl-shim:$LD_LIBRARY_PATH"
fi
unset _torch_lib
