#!/usr/bin/env bash
# The bounded fuzz campaign of docs/fuzzing.md: each target of fuzz/ (or the ones named) runs for
# RUNS executions (default 10 000 000) from fuzz/seeds/TARGET plus the corpus it grows in
# fuzz/corpus/TARGET, on one core at low priority. A crash stops the script and leaves its input in
# fuzz/artifacts/TARGET/; fix it, and add the input as a regression test.
#
#   scripts/fuzz.sh                      # every target, 10M executions each
#   RUNS=100000 scripts/fuzz.sh manifest # one target, a quick check
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`,
# `cargo install cargo-fuzz`). The results go to fuzz/logs/TARGET.log and one line each to
# fuzz/logs/campaign.tsv (target, executions, seconds, exit status).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
RUNS="${RUNS:-10000000}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
  exit 2
fi
# Release with debug assertions and overflow checks (-O -a): an arithmetic overflow is a crash.
# No sanitizer (-s none): the code under test is safe Rust, and ASan would cost ~3x the executions;
# allocations are bounded by -rss_limit_mb instead.
FLAGS=(-O -a -s none)
cargo +nightly fuzz build "${FLAGS[@]}"
if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list); fi
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  start=$(date +%s)
  status=0
  nice -n 15 cargo +nightly fuzz run "${FLAGS[@]}" "$t" "corpus/$t" "seeds/$t" -- \
    -runs="$RUNS" -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"logs/$t.log" 2>&1 || status=$?
  secs=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -n 1)
  printf '%s\t%s\t%s\t%s\n' "$t" "${execs:-?}" "$secs" "$status" | tee -a logs/campaign.tsv
  if [ "$status" -ne 0 ]; then
    echo "fuzz.sh: $t failed (exit $status); see fuzz/logs/$t.log and fuzz/artifacts/$t/" >&2
    exit "$status"
  fi
done
