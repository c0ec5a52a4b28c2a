#!/usr/bin/env bash
# Runs kiln's whole test suite. Installs the Debian packages the tests use
# when they are missing (the end-to-end tests check images with tools nobody
# here wrote). Needs root: builds mount overlayfs.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in umoci skopeo oci-image-tool tar runc busybox-static docker-registry apache2-utils git openssl openssh-client debootstrap gcc libc6-dev gzip curl python3-venv qemu-user-static tmux docker.io systemd; do
  # busybox-static specifically: FROM scratch steps need a static binary.
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -z "${KILN_CORPUS:-}" ] && [ ! -d ../shared/corpus ]; then
  echo "note: conformance corpus not found at ../shared/corpus; set KILN_CORPUS (its tests will fail loudly)" >&2
fi

# Validators from PyPI the tests use (target/tools/venv), then the farm's
# Kubernetes manifests (docs/farm.md) against the API schemas.
./scripts/tools.sh
./scripts/validate-k8s.sh
# An arm64 busybox for the emulated multi-platform test (the machine's own
# package lists get arm64 added once).
./scripts/foreign-busybox.sh arm64

# End-to-end tests run the built kilnd/kilnctl binaries.
cargo build --workspace --all-targets
cargo test --workspace
