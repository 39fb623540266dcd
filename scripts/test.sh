#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), prepares the datasets if missing, and runs
# every test of the workspace (unit, integration, end to end).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup-chromium.sh   # the run report's browser check (tests/report.rs)
source scripts/env.sh
cargo build --locked --bins
[ -f data/mnist1d/manifest.json ] || ./target/debug/butler data prepare mnist1d
[ -f data/digits/manifest.json ] || ./target/debug/butler data prepare digits
[ -f data/mnist1d-val500/manifest.json ] || ./target/debug/butler data prepare mnist1d --val 500 --out data/mnist1d-val500
bash deploy/check.sh
cargo test --locked --workspace -- --test-threads="${BUTLER_TEST_THREADS:-2}"
