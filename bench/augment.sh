#!/usr/bin/env bash
# Benchmark: butler's per-sample augmentation (raw f32 buffers, loader threads) vs
# torchvision.transforms.v2 (one process, one thread, one call per sample, like a DataLoader worker) on
# 32×32 images, then butler alone on MNIST-1D-length signals (weak, strong, and both views per sample).
# Extra arguments go to bench/augment_vs_torchvision.py (e.g. --samples 2000 --kinds float).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
python bench/augment_vs_torchvision.py --butler target/release/butler "$@"
echo
echo "# 1-D (MNIST-1D length 40), butler only"
for p in weak strong weak-strong; do
  target/release/butler bench augment --shape 40 --pipeline "$p" --samples 500000 --threads 1
done
