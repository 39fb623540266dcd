#!/usr/bin/env bash
# The contrastive results table of the README: MNIST-1D, SimCLR and CPC pretraining on a 100k-sample
# unlabeled pool at global batch 256 and 4096 on 2 workers, then a linear probe and fine-tuning with 40
# labels per class, versus supervised-only with 40 labels per class (with and without the augmentation);
# mean ± std over the seeds. Rows are defined in scripts/contrastive.py.
# usage: scripts/contrastive.sh [SEEDS (default 3)] [ROW ...]   (rows: supervised supervised-aug
#        simclr-256 simclr-4096 cpc-256 cpc-4096 (default: these six), and the diagnostics
#        simclr-256-no-lpft simclr-256-16ep random-encoder simclr-4096-sqrt-lr, and the SimCLRv2
#        rows simclrv2 supervised-distill simclrv2-plain-kd simclrv2-100ep simclrv2-clean-teacher
#        simclrv2-100ep-clean-teacher supervised-distill-clean-teacher on data/mnist1d-val500)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seeds="${1:-3}"; shift || true
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(supervised supervised-aug simclr-256 cpc-256 simclr-4096 cpc-4096)
source scripts/env.sh
# BUTLER=path runs a binary built earlier (e.g. a copy, while the tree is being edited).
[ -n "${BUTLER:-}" ] || cargo build --bins
butler=${BUTLER:-./target/debug/butler}   # the dev profile is optimised (Cargo.toml)
pool=bench-data/mnist1d-pool-100000
v2=0
for row in "${rows[@]}"; do
  case "$row" in simclrv2*|supervised-distill*) v2=1 ;; *) v1=1 ;; esac
done
if [ "$v2" = 1 ] && [ ! -f data/mnist1d-val500/manifest.json ]; then
  $butler data prepare mnist1d --val 500 --out data/mnist1d-val500
fi
if [ "${v1:-0}" = 1 ] && [ ! -f "$pool/manifest.json" ]; then
  $butler data prepare mnist1d --out "$pool"
  $butler data prepare mnist1d --num-samples 100000 --shard-size 10000 --out "$pool"   # the layout the README figures used
fi
out=runs/contrastive
.venv/bin/python scripts/contrastive.py configs "$out/configs" >/dev/null
for row in "${rows[@]}"; do
  for s in $(seq 0 $((seeds - 1))); do
    start=$(date +%s)
    [ -f "$out/$row/seed-$s/summary.json" ] || \
      $butler run "$out/configs/$row.toml" --workers 2 --seed "$s" --out "$out/$row/seed-$s" >/dev/null
    echo "$row seed $s: $(( $(date +%s) - start ))s" >&2
  done
done
.venv/bin/python scripts/contrastive.py table "$out"
