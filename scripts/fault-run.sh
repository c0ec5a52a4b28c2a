#!/usr/bin/env bash
# The long fault and hostile-input run (docs/security.md): every case of the
# hostile corpus (tests/src/hostile.rs), concurrent mixed builds and kill -9
# of kilnd mid-build, for the built-in sandbox and runc. Needs root.
#   ./scripts/fault-run.sh                     # 40 kills, 50 concurrent builds, both runtimes
#   ./scripts/fault-run.sh --kills 200 --runtime sandbox
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in runc busybox-static gcc; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  }
done
cargo build --release --workspace --bins
exec ./target/release/kiln-fault-run "$@"
