#!/usr/bin/env bash
# Benchmark: time per SimCLR step at global batch 4096 on 2 workers, butler vs PyTorch DDP (gloo) with a
# gradient-carrying all-gather; extra arguments go to bench/simclr_vs_ddp.py (e.g. --iters 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
cargo build --bins
.venv/bin/python bench/simclr_vs_ddp.py --butler target/debug/butler "$@"
