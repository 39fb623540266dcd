#!/usr/bin/env bash
# The semi-supervised results table (README): installs, prepares data (MNIST-1D, digits, the shifted
# MNIST-1D, and MNIST-1D plus a 100,000-sample generated unlabeled pool), builds, then runs scripts/ssl.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
b=./target/release/butler
# Every dataset holds out a stratified validation split (`--val`): the recipes were chosen on it, and
# the test split is evaluated once, at the end of each run.
[ -f data/mnist1d-val500/manifest.json ] || $b data prepare mnist1d --val 500 --out data/mnist1d-val500
[ -f data/digits-val200/manifest.json ] || $b data prepare digits --val 200 --out data/digits-val200
[ -f data/mnist1d-shift-val500/manifest.json ] || $b data prepare mnist1d-shift --val 500 --out data/mnist1d-shift-val500
if [ ! -f data/mnist1d-val500-pool/manifest.json ]; then
  $b data prepare mnist1d --val 500 --out data/mnist1d-val500-pool
  $b data prepare mnist1d --out data/mnist1d-val500-pool --num-samples 100000
fi
python scripts/ssl.py "$b" "$@"
