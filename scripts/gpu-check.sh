#!/usr/bin/env bash
# The GPU self-check, in two halves.
#
#   bash scripts/gpu-check.sh            # here (no GPU needed): build, stage what travels in gpu-stage/
#   bash scripts/gpu-check.sh --device   # on the lent GPU machine, e.g. through the device tool:
#                                        #   run(command="bash scripts/gpu-check.sh --device",
#                                        #       carry=["gpu-stage"], timeout_s=420)
#   bash scripts/gpu-check.sh --dry-run  # here: the device half's training comparison on the CPU
#
# The device machine has torch 2.11.0+cu130 (the libtorch tch 0.24 builds against) but no Rust toolchain
# and no network, so the binary is built here and linked at run time against the device's own
# libtorch; the `libnccl.so` name cudarc loads is made there, next to the wheel's libnccl.so.2. The device
# half runs `butler doctor`, `butler doctor --check` (CUDA ≡ CPU training for supervised, FixMatch and
# SimCLR; a world-1 NCCL communicator; the ring on CUDA tensors; bf16; checkpoint portability) and the
# benchmarks against torch.distributed NCCL and plain PyTorch (bench/gpu_vs_torch.py), and prints one
# summary table (also written to $OUT/gpu-check.txt when $OUT is set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-stage}"

if [ "$mode" = "stage" ] || [ "$mode" = "--dry-run" ]; then
  bash scripts/setup.sh
  source scripts/env.sh
  # The dev profile builds every dependency and the worker crate at opt-level 3 (Cargo.toml), so its
  # binary is the one the tests use; stripped it is small enough to travel.
  cargo build --locked --bin butler
  mkdir -p gpu-stage
  strip -o gpu-stage/butler target/debug/butler
  ls -la gpu-stage/butler
  if [ "$mode" = "--dry-run" ]; then
    exec "$BUTLER_PYTHON" bench/gpu_vs_torch.py --butler gpu-stage/butler --device cpu --steps 50 --batch 256
  fi
  echo "staged; on the device: bash scripts/gpu-check.sh --device (carry gpu-stage)"
  exit 0
fi

[ "$mode" = "--device" ] || { echo "usage: $0 [--device|--dry-run]" >&2; exit 2; }
[ -x gpu-stage/butler ] || { echo "gpu-stage/butler is missing: run scripts/gpu-check.sh here first and carry gpu-stage" >&2; exit 2; }
py="${PYTHON:-python3}"
torch_lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
nccl_so="$("$py" - <<'PY'
import glob, os, site, torch
roots = site.getsitepackages() + [os.path.dirname(os.path.dirname(torch.__file__))]
hits = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "nccl", "lib", "libnccl.so.2"))]
print(hits[0] if hits else "")
PY
)"
shim="$(mktemp -d)"
if [ -n "$nccl_so" ]; then ln -s "$nccl_so" "$shim/libnccl.so"; else echo "warning: no libnccl.so.2 next to torch" >&2; fi
export LD_LIBRARY_PATH="$torch_lib:$shim${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NCCL's own messages go to stderr, so stdout stays the JSON the script parses.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}" NCCL_DEBUG="${NCCL_DEBUG:-WARN}" NCCL_DEBUG_FILE=/dev/stderr
# The binary needs glibc >= 2.34 and libstdc++ >= GLIBCXX_3.4.29, and libtorch from the path above: say
# so now rather than mid-run.
if ldd gpu-stage/butler 2>&1 | grep 'not found' >&2; then
  echo "gpu-stage/butler cannot load its libraries on this machine (above); nothing run" >&2
  exit 2
fi
out="${OUT:-.}/gpu-check.txt"
set +e
timeout 300 "$py" bench/gpu_vs_torch.py --butler gpu-stage/butler --device cuda 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
echo "exit status $rc; summary in $out"
exit "$rc"
