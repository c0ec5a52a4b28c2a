#!/usr/bin/env bash
# Records the parity suite's expected snapshots (tests/parity/expected) with
# the BuildKit in Debian's Docker 20.10: starts a private dockerd (as bench/
# does), builds the base image with kiln and loads it into Docker as
# parity-base:1, then builds every case (or the ones named) with Docker.
#   ./scripts/parity-record.sh                 # every case
#   ./scripts/parity-record.sh arg-after-env   # some cases
# CI never runs this: it only compares kiln against the committed snapshots.
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in docker.io busybox-static; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  }
done
cargo build --release --workspace --bins
W=$(mktemp -d /tmp/kiln-parity-record.XXXXXX)
cleanup() {
  [ -f "$W/docker.pid" ] && kill "$(cat "$W/docker.pid")" 2>/dev/null && sleep 2
  [ -f "$W/kilnd.pid" ] && kill "$(cat "$W/kilnd.pid")" 2>/dev/null && sleep 1
  umount -R "$W/docker/exec" 2>/dev/null || true
  rm -rf "$W" 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$W/docker" "$W/base"
/usr/sbin/dockerd -H "unix://$W/docker.sock" --data-root "$W/docker/root" --exec-root "$W/docker/exec" \
  --pidfile "$W/docker.pid" --iptables=false --bridge=none --storage-driver=overlay2 >"$W/dockerd.log" 2>&1 &
export PARITY_DOCKER_HOST="unix://$W/docker.sock"
for _ in $(seq 150); do DOCKER_HOST=$PARITY_DOCKER_HOST docker info >/dev/null 2>&1 && break; sleep 0.2; done
DOCKER_HOST=$PARITY_DOCKER_HOST docker info >/dev/null || { echo "dockerd did not start ($W/dockerd.log)" >&2; exit 1; }
# The base: built by kiln (reproducibly), so kiln's test run starts from the same image.
./target/release/kilnd --root "$W/kiln" --addr "unix://$W/kilnd.sock" --log-level warn 2>"$W/kilnd.log" &
echo $! > "$W/kilnd.pid"
for _ in $(seq 100); do [ -S "$W/kilnd.sock" ] && break; sleep 0.05; done
cp tests/parity/base/Dockerfile /bin/busybox "$W/base/"
SOURCE_DATE_EPOCH=0 ./target/release/kilnctl build --addr "unix://$W/kilnd.sock" --progress quiet \
  -t parity-base:1 -o "type=docker,dest=$W/base.tar" "$W/base"
DOCKER_HOST=$PARITY_DOCKER_HOST docker load -q -i "$W/base.tar"
./target/release/kiln-parity-record "$@"
