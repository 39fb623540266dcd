#!/usr/bin/env bash
# The run report in a real browser: trains a short real job with `butler run` (which writes the report),
# renders RUN_DIR/report.html in headless Chromium, takes a screenshot and checks the rendered page:
# the charts are there (SVG with drawn lines, axis text and legends), the final table and the config
# are there, the page loads nothing from elsewhere, and the browser logged no console message.
#
#   scripts/report-check.sh [--run-dir DIR] [--screenshot PNG] [--work DIR]
#
#   --run-dir DIR     check the report of this run directory instead of training a job
#   --screenshot PNG  where the screenshot goes (default: WORK/report.png); docs/report.png is made so
#   --work DIR        scratch directory (default: a fresh temporary one)
#
# Environment: BUTLER (the binary; default target/debug/butler), REPORT_CHECK_STEPS (the job's
# train.steps, default 140), REPORT_CHECK_CONFIG (default examples/mnist1d-40-uda.toml).
# Needs Chromium: scripts/setup-chromium.sh installs Debian's package. Exit 0: every check passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh

run_dir="" shot="" work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --screenshot) shot="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) echo "report-check: unknown argument $1" >&2; exit 2 ;;
  esac
done

fail() { echo "report-check: FAIL: $*" >&2; exit 1; }
say() { echo "report-check: $*"; }

chromium=""
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then chromium="$(command -v "$b")"; break; fi
done
[ -n "$chromium" ] || { echo "report-check: no Chromium on PATH; run scripts/setup-chromium.sh" >&2; exit 3; }

butler="${BUTLER:-target/debug/butler}"
[ -x "$butler" ] || fail "$butler is not built (cargo build --bins)"
[ -n "$work" ] || work="$(mktemp -d -t butler-report-check.XXXXXX)"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
[ -n "$shot" ] || shot="$work/report.png"

# Chromium runs as root in CI (no sandbox then) and needs a writable profile of its own.
browse() {
  "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$work/chromium-profile" --enable-logging=stderr --v=0 "$@"
}

# The console detector must see what it is meant to see: a page with a script error logs CONSOLE
# lines. (Chromium logs every console message as INFO:CONSOLE whatever its level; the report has no
# script, so any console line at all is a failure.)
printf '<!DOCTYPE html><html><body><script>console.error("probe"); notAFunction();</script></body></html>' \
  >"$work/control.html"
browse --dump-dom "file://$work/control.html" >/dev/null 2>"$work/control.log" || true
grep -q ':CONSOLE' "$work/control.log" || fail "the console detector saw nothing on a page with a script error (see $work/control.log)"

if [ -z "$run_dir" ]; then
  config="${REPORT_CHECK_CONFIG:-examples/mnist1d-40-uda.toml}"
  steps="${REPORT_CHECK_STEPS:-140}"
  manifest="$(sed -n 's/^manifest *= *"\([^"]*\)".*/\1/p' "$config" | head -n 1)"
  if [ ! -f "$manifest/manifest.json" ]; then
    case "$manifest" in
      data/mnist1d-val500) "$butler" data prepare mnist1d --val 500 --out data/mnist1d-val500 ;;
      data/mnist1d) "$butler" data prepare mnist1d ;;
      *) fail "$manifest is not prepared" ;;
    esac
  fi
  # The example, shortened: fewer steps, an evaluation every epoch, so the curves have points.
  sed -e "s/^steps = .*/steps = $steps/" -e "s/^eval_every = .*/eval_every = 1/" \
    -e "s/^epochs = .*/epochs = 6/" "$config" >"$work/job.toml"
  run_dir="$work/run"
  say "training $(basename "$config") for $steps steps with 2 workers → $run_dir"
  t0=$SECONDS
  "$butler" run "$work/job.toml" --workers 2 --out "$run_dir" | tee "$work/run.out"
  say "trained in $((SECONDS - t0)) s"
  grep -q "^report: $run_dir/report.html" "$work/run.out" || fail "butler run did not print 'report: $run_dir/report.html'"
else
  "$butler" report "$run_dir" >"$work/report.out"
  grep -q '^report: ' "$work/report.out" || fail "butler report did not print the report's path"
fi
report="$(cd "$run_dir" && pwd)/report.html"
[ -s "$report" ] || fail "$report was not written"

# Self-contained: nothing to fetch at view time.
if grep -Eqi '(src|href)="[a-z]+:|url\(|@import|<script|<link' "$report"; then
  fail "$report refers to something outside itself: $(grep -Eoi '(src|href)="[a-z]+:[^"]*"|url\([^)]*\)|@import[^;]*|<script[^>]*>|<link[^>]*>' "$report" | head -n 3)"
fi

say "rendering $report in $("$chromium" --version 2>/dev/null | head -n 1)"
browse --dump-dom "file://$report" >"$work/dom.html" 2>"$work/dom.log"
browse --screenshot="$shot" --window-size=1360,1900 --force-device-scale-factor=1 \
  "file://$report" >/dev/null 2>"$work/screenshot.log"

count() { grep -o "$1" "$work/dom.html" | wc -l; }
figures=$(count '<figure class="chart"')
svgs=$(count '<svg')
# Curves and their legend lines are drawn 2 px wide (the grid is 1 px).
lines=$(count '<polyline[^>]*stroke-width="2"')
texts=$(count '<text')
say "rendered DOM: $figures charts, $svgs svg, $lines curves and legend lines, $texts text elements"
[ "$figures" -ge 4 ] || fail "expected at least 4 charts (loss, accuracy, learning rate, throughput), found $figures"
[ "$svgs" -eq "$figures" ] || fail "$figures chart figures but $svgs svg elements"
[ "$lines" -ge $((figures * 2)) ] || fail "too few curves ($lines 2-px lines) for $figures charts"
[ "$texts" -ge $((figures * 8)) ] || fail "too few text elements ($texts) for axis labels and legends"
# plotters writes each chart text (title, axis label, legend entry) on a line of its own.
for want in Loss Accuracy epoch train; do
  grep -qxF -- "$want" "$work/dom.html" || fail "the rendered page lacks the chart text '$want'"
done
for want in 'class="final"' 'class="config"' '<th>test_accuracy</th>'; do
  grep -qF -- "$want" "$work/dom.html" || fail "the rendered page lacks $want"
done
if grep -q ':CONSOLE' "$work/dom.log" "$work/screenshot.log"; then
  fail "console messages while rendering the report: $(grep -h ':CONSOLE' "$work/dom.log" "$work/screenshot.log" | head -n 5)"
fi

[ -s "$shot" ] || fail "no screenshot at $shot"
magic="$(head -c 8 "$shot" | od -An -tx1 | tr -d ' \n')"
[ "$magic" = "89504e470d0a1a0a" ] || fail "$shot is not a PNG"
bytes=$(wc -c <"$shot")
# A blank page compresses to a few KB; charts, tables and text do not.
[ "$bytes" -gt 30000 ] || fail "the screenshot is suspiciously small ($bytes bytes): a blank page?"
say "screenshot $shot ($bytes bytes)"
say "OK"
