#!/usr/bin/env bash
# The main job: installs what it needs (idempotent), prepares MNIST-1D if missing, builds, and runs
# `butler run examples/mnist1d-supervised.toml` (2 workers). Extra arguments go to `butler run`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
[ -f data/mnist1d/manifest.json ] || ./target/release/butler data prepare mnist1d
exec ./target/release/butler run examples/mnist1d-supervised.toml "$@"
