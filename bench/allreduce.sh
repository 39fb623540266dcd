#!/usr/bin/env bash
# Benchmark: butler's TCP ring all-reduce vs torch.distributed gloo, 2 processes on this machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
python bench/allreduce_vs_gloo.py --butler target/release/butler "$@"
