#!/usr/bin/env bash
# The semi-supervised results table (README): installs, prepares data (MNIST-1D, digits, the shifted
# MNIST-1D, and MNIST-1D plus a 100,000-sample generated unlabeled pool), builds, then runs scripts/ssl.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
b=./target/release/butler
[ -f data/mnist1d/manifest.json ] || $b data prepare mnist1d
[ -f data/digits/manifest.json ] || $b data prepare digits
[ -f data/mnist1d-shift/manifest.json ] || $b data prepare mnist1d-shift
if [ ! -f data/mnist1d-pool/manifest.json ]; then
  $b data prepare mnist1d --out data/mnist1d-pool
  $b data prepare mnist1d --out data/mnist1d-pool --num-samples 100000
fi
python scripts/ssl.py "$b" "$@"
