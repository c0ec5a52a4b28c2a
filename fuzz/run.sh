#!/usr/bin/env bash
# Runs both fuzz targets (parser+converter, word expander) for SECONDS each
# (default 300), seeded with the conformance corpus when it is present.
# Needs a nightly toolchain and cargo-fuzz; installs them when missing.
# Usage: fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-300}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
CORPUS=${KILN_CORPUS:-../../shared/corpus}
SEEDS=$(mktemp -d)
trap 'rm -rf "$SEEDS"' EXIT
mkdir -p "$SEEDS/parse" "$SEEDS/expand"
if [ -d "$CORPUS" ]; then
  i=0
  while IFS= read -r f; do i=$((i + 1)); cp "$f" "$SEEDS/parse/seed$i"; done \
    < <(find "$CORPUS" -type f \( -name '*Dockerfile*' -o -path '*testfiles*' \))
  echo "seeded with $i corpus files from $CORPUS"
else
  echo "note: no corpus at $CORPUS (set KILN_CORPUS); fuzzing from scratch"
fi
cargo +nightly fuzz run parse "$SEEDS/parse" -- -max_total_time="$SECS" -rss_limit_mb=2048
cargo +nightly fuzz run expand "$SEEDS/expand" -- -max_total_time="$SECS"
