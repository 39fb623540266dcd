#!/usr/bin/env bash
# Runs a job config over several seeds and prints each test accuracy and the mean ± std — the command
# behind the README's results tables.
# usage: scripts/seeds.sh CONFIG [SEEDS (default 5)] [WORKERS (default 2)]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config="$1"; seeds="${2:-5}"; workers="${3:-2}"
bash scripts/setup.sh
source scripts/env.sh
cargo build --locked --release --bins
for d in mnist1d digits; do
  [ -f "data/$d/manifest.json" ] || ./target/release/butler data prepare "$d"
done
name="$(basename "$config" .toml)"
for s in $(seq 0 $((seeds - 1))); do
  ./target/release/butler run "$config" --workers "$workers" --seed "$s" --out "runs/seeds/$name/seed-$s" >/dev/null
done
python3 - "$name" "$seeds" <<'PY'
import json, statistics, sys
name, n = sys.argv[1], int(sys.argv[2])
accs = [json.load(open(f"runs/seeds/{name}/seed-{s}/summary.json"))["test_accuracy"] for s in range(n)]
print(f"{name}: " + " ".join(f"{a:.4f}" for a in accs))
print(f"{name}: mean {100 * statistics.mean(accs):.1f}% ± {100 * statistics.stdev(accs):.1f} (std over {n} seeds)")
PY
