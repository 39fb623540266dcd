#!/usr/bin/env bash
# Benchmark: resumable checkpoints — size, write time (atomic write + fsync + SHA-256), load time, and the
# training overhead of committing every N steps — for ConvBase and a large MLP, next to torch.save /
# torch.load of the very same tensors (read back from butler's file) in plain PyTorch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
cargo build --bins
.venv/bin/python -P bench/checkpoint_vs_torch.py --butler target/debug/butler "$@"
