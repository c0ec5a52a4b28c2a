#!/usr/bin/env bash
# The README's first command: builds kiln (release), installs kilnd and
# kilnctl into /usr/local/bin, builds the example image end to end (as an
# OCI tarball and as a root filesystem) and runs it with chroot. Needs root
# and a Rust toolchain; installs busybox-static when missing. Without a
# running kilnd, kilnctl builds in-process on /var/lib/kiln.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /bin/busybox ]; then
  echo "installing busybox-static (the example's base)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
command -v cargo >/dev/null || { echo "needs a Rust toolchain: https://rustup.rs" >&2; exit 1; }
echo "building kiln (release; the first build takes a few minutes)"
cargo build --release -q -p kilnd -p kilnctl
install -m 0755 target/release/kilnd target/release/kilnctl /usr/local/bin/
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp -r testdata/examples/hello/. "$ctx"
cp /bin/busybox "$ctx/busybox"
rm -rf hello-rootfs
kilnctl build "$ctx" -t hello:latest -o type=oci,dest=hello.tar -o type=local,dest=hello-rootfs
echo "--- hello.tar is an OCI image (umoci, skopeo, podman load); running its filesystem with chroot:"
chroot hello-rootfs /usr/local/bin/hello
