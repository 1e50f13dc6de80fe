#!/usr/bin/env bash
# Profiles webhook-emitter's data path (bench/profile/README.md). Writes bench/results/profile.md.
#   1. the pure core, natively and under V8 (Node), through bench/profile/core-driver: ns per stream;
#   2. callgrind on the native driver: instructions per function, for a job completion with 1 webhook;
#   3. Envoy under load (bench/profile/envoy_profile.py): no filter vs a do-nothing proxy-wasm filter vs ours vs Lua,
#      CPU per request, and perf (cpu-clock) by shared object and symbol.
#   4. ablations (bench/profile/ablate.py: copies of src/ without signing, or without metric host calls)
#      measured against the filter as it is, in the same A/B pairs.
# Knobs: WASM (default: the release build), PAIRS (6), DURATION (2 s per step), PERF (0 to skip perf).
# Uses strace when present. About 7 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
WASM="${WASM:-target/wasm32-wasip1/release/webhook_emitter.wasm}"
OUT="${OUT:-bench/results/profile.md}"
TD=.cache/bench-driver
mkdir -p "$TD" .cache
for crate in core-driver noop-filter; do
  cp Cargo.lock "bench/profile/$crate/Cargo.lock"  # the product's pinned versions
done
cargo build -q --release --manifest-path bench/profile/core-driver/Cargo.toml --target-dir "$TD"
cargo build -q --release --manifest-path bench/profile/core-driver/Cargo.toml --target-dir "$TD" --target wasm32-wasip1
cargo build -q --release --manifest-path bench/profile/noop-filter/Cargo.toml --target-dir "$TD" --target wasm32-wasip1
rm -f bench/profile/core-driver/Cargo.lock bench/profile/noop-filter/Cargo.lock
NATIVE="$TD/release/webhook-emitter-core-driver"
WDRIVER="$TD/wasm32-wasip1/release/webhook-emitter-core-driver.wasm"
NOOP="$TD/wasm32-wasip1/release/noop_filter.wasm"

{
  echo "# Profile of webhook-emitter's data path"
  echo
  echo "\`bench/profile/profile.sh\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit \`$(git rev-parse --short HEAD)\`, wasm \`$WASM\` ($(stat -c %s "$WASM") bytes)."
  echo
  echo "## 1. The pure core alone (no host), ns per stream"
  echo
  echo "| what | native (x86-64, opt-level s) | wasm under V8 (Node $(node --version)) |"
  echo "|---|---|---|"
  for spec in "nomatch 2000000 1" "event 200000 1" "event 50000 10"; do
    set -- $spec
    n=$("$NATIVE" "$1" "$2" "$3" | sed 's/.*ns_per_iteration=//')
    w=$(node --no-warnings bench/profile/run-wasm.mjs "$WDRIVER" "$1" "$2" "$3" | sed 's/.*ns_per_iteration=//')
    echo "| $1, $3 webhook(s) | $n | $w |"
  done
  echo
  echo "## 2. callgrind: one job completion, 1 webhook (instructions, inclusive, per stream)"
  echo
  valgrind --tool=callgrind --callgrind-out-file=.cache/callgrind.event.out "$NATIVE" event 20000 1 >/dev/null 2>&1
  echo '```'
  callgrind_annotate --auto=no --inclusive=yes --threshold=99 .cache/callgrind.event.out > .cache/callgrind.event.txt 2>/dev/null
  callgrind_annotate --auto=no --threshold=95 .cache/callgrind.event.out > .cache/callgrind.event.self.txt 2>/dev/null
  awk '/^ *[0-9,]+ \(/ && n < 45 { n++; line = $0; match(line, /^ *[0-9,]+/); c = substr(line, RSTART, RLENGTH)
    gsub(/[ ,]/, "", c); sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line)
    gsub(/\/root\/\.cargo\/registry\/src\/[^\/]+\//, "", line); gsub(/\/rustc\/[0-9a-f]+\/library\//, "", line)
    sub(/ \[[^]]*\]$/, "", line); printf "%8.0f  %s\n", c / 20000, line }' .cache/callgrind.event.txt
  echo '```'
  echo
  echo "Self cost (exclusive instructions per stream, the functions that make up 95%):"
  echo
  echo '```'
  awk '/^ *[0-9,]+ \(/ { line = $0; match(line, /^ *[0-9,]+/); c = substr(line, RSTART, RLENGTH)
    gsub(/[ ,]/, "", c); sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", line)
    gsub(/\/root\/\.cargo\/registry\/src\/[^\/]+\//, "", line); gsub(/\/rustc\/[0-9a-f]+\/library\//, "", line)
    sub(/ \[[^]]*\]$/, "", line); if (line != "PROGRAM TOTALS" && m++ < 30) printf "%8.0f  %s\n", c / 20000, line }' \
    .cache/callgrind.event.self.txt
  echo '```'
} > "$OUT.tmp"

FLAGS=()
if [ "${PERF:-1}" = 1 ] && perf record -q -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then FLAGS+=(--perf); fi
if command -v strace >/dev/null; then FLAGS+=(--strace); fi
.venv/bin/python bench/profile/ablate.py > .cache/ablations.txt  # fails the script if a build fails
while read -r a; do FLAGS+=(--ablation "$a"); done < .cache/ablations.txt
.venv/bin/python bench/profile/envoy_profile.py --wasm "$WASM" --noop "$NOOP" --pairs "${PAIRS:-6}" \
  --duration "${DURATION:-2}" "${FLAGS[@]}" --out "$OUT.envoy"
{
  cat "$OUT.tmp"
  echo
  echo "## 3. Envoy under closed-loop load, one worker pinned to one core, by difference"
  echo
  cat "$OUT.envoy"
} > "$OUT"
rm -f "$OUT.tmp" "$OUT.envoy"
echo "wrote $OUT"
