#!/usr/bin/env bash
# Fetches Debian's busybox-static for another architecture (default arm64)
# into target/tools/busybox-ARCH, for tests that build multi-platform bases
# without a public registry. Adds the architecture to dpkg and refreshes the
# package lists the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${1:-arm64}
OUT=target/tools/busybox-$ARCH
[ -x "$OUT" ] && exit 0
mkdir -p target/tools
if ! dpkg --print-foreign-architectures | grep -qx "$ARCH"; then
  dpkg --add-architecture "$ARCH"
  apt-get update -qq
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "busybox-static:$ARCH" >/dev/null 2>&1) || {
  apt-get update -qq
  (cd "$work" && apt-get download -qq "busybox-static:$ARCH")
}
dpkg-deb -x "$work"/busybox-static_*_"$ARCH".deb "$work/x"
install -m 0755 "$work/x/bin/busybox" "$OUT"
