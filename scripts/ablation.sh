#!/usr/bin/env bash
# The regularizer ablation table (README): installs, prepares data, builds, then runs scripts/ablation.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
for d in mnist1d digits; do
  [ -f "data/$d/manifest.json" ] || ./target/release/butler data prepare "$d"
done
python scripts/ablation.py target/release/butler "$@"
