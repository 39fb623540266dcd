#!/usr/bin/env bash
# Benchmark: stream unlabeled MNIST-1D pools of 100k and 1M samples with weak+strong augmentation on
# 2 local worker processes; prints samples/s and peak RSS per rank for both pool sizes (RSS must stay flat).
# The pools are generated once into bench-data/ (1M takes ~2-3 minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
b=./target/release/butler
for n in 100000 1000000; do
  dir="bench-data/mnist1d-pool-$n"
  if [ ! -f "$dir/manifest.json" ] || ! grep -q '"unlabeled"' "$dir/manifest.json"; then
    rm -rf "$dir"
    $b data prepare mnist1d --out "$dir" >/dev/null
    $b data prepare mnist1d --out "$dir" --num-samples "$n" --shard-size 10000 >/dev/null
  fi
  $b bench stream --manifest "$dir" --split unlabeled --world 2 --batch 512 --threads 1
done
