#!/usr/bin/env bash
# Observability overhead: training samples/s of the same job with everything on (per-step scalars every
# 10 steps with their all-reduce and RPC, TensorBoard, steps.jsonl, Prometheus /metrics scraped every
# second) vs off (metrics.every_steps = 0, tensorboard = false, no /metrics). The per-step timing in the
# heartbeat cannot be switched off; it is a handful of atomic adds per step. Runs alternate on/off
# so drift on the machine hits both; prints each run and the ratio of the medians (target: < 2 % slower).
#
# Usage: bench/observe.sh [RUNS (default 3)] [STEPS (default 600)]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
runs="${1:-3}"
steps="${2:-600}"
cargo build --locked --release --bins >/dev/null
bin=target/release/butler
[ -f data/mnist1d-val500/manifest.json ] || $bin data prepare mnist1d --val 500 --out data/mnist1d-val500 >/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
base() {
  sed -e "s/^steps = 6000/steps = $steps/" -e 's/^eval_every = 100/eval_every = 1000/' examples/mnist1d-40-uda.toml
}
{ base; printf '\n[metrics]\nevery_steps = 10\ntensorboard = true\n'; } > "$work/on.toml"
{ base; printf '\n[metrics]\nevery_steps = 0\ntensorboard = false\n'; } > "$work/off.toml"
port=$((20000 + RANDOM % 20000))
rate() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['samples_per_second'])" "$1/summary.json"; }
on=(); off=()
for i in $(seq 1 "$runs"); do
  $bin run "$work/off.toml" --workers 2 --out "$work/off-$i" >/dev/null 2>&1
  off+=("$(rate "$work/off-$i")")
  $bin run "$work/on.toml" --workers 2 --out "$work/on-$i" --metrics-listen "127.0.0.1:$port" >/dev/null 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    curl -s "http://127.0.0.1:$port/metrics" >/dev/null || true
    sleep 1
  done
  wait "$pid"
  on+=("$(rate "$work/on-$i")")
  echo "run $i: off ${off[-1]} samples/s, on ${on[-1]} samples/s"
done
python3 - "${off[*]}" "${on[*]}" <<'PY'
import statistics, sys
off = [float(x) for x in sys.argv[1].split()]
on = [float(x) for x in sys.argv[2].split()]
mo, mn = statistics.median(off), statistics.median(on)
print(f"median samples/s: off {mo:.0f}, on {mn:.0f}; on/off = {mn / mo:.4f} ({(1 - mn / mo) * 100:+.2f} % slower with everything on)")
PY
