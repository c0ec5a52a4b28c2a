#!/usr/bin/env bash
# Records testdata/buildkit-inline-cache/image: an image with inline cache
# (moby.buildkit.cache.v0) as the BuildKit in Debian's Docker 20.10 pushes it
# (`docker build --build-arg BUILDKIT_INLINE_CACHE=1` + `docker push`),
# copied from a local registry with skopeo (its dir: format). The cache
# tests push it to their registry and give it to kiln's --cache-from.
# CI never runs this; the copy is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in docker.io docker-registry skopeo; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  }
done
W=$(mktemp -d /tmp/kiln-inline-record.XXXXXX)
cleanup() {
  [ -f "$W/docker.pid" ] && kill "$(cat "$W/docker.pid")" 2>/dev/null && sleep 2
  [ -f "$W/registry.pid" ] && kill "$(cat "$W/registry.pid")" 2>/dev/null
  umount -R "$W/docker/exec" 2>/dev/null || true
  rm -rf "$W" 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$W/docker" "$W/ctx"
PORT=5099
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$W/reg" "$PORT" >"$W/reg.yml"
docker-registry serve "$W/reg.yml" >/dev/null 2>&1 &
echo $! >"$W/registry.pid"
/usr/sbin/dockerd -H "unix://$W/docker.sock" --data-root "$W/docker/root" --exec-root "$W/docker/exec" \
  --pidfile "$W/docker.pid" --iptables=false --bridge=none --storage-driver=overlay2 >"$W/dockerd.log" 2>&1 &
DOCKER=/usr/bin/docker  # the 20.10 CLI: it builds with its BuildKit, no buildx
export DOCKER_HOST="unix://$W/docker.sock"
for _ in $(seq 150); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
cp testdata/buildkit-inline-cache/Dockerfile testdata/buildkit-inline-cache/a.txt testdata/buildkit-inline-cache/b.txt "$W/ctx/"
IMG="127.0.0.1:$PORT/bk/inline:1"
DOCKER_BUILDKIT=1 "$DOCKER" build --network=none --build-arg BUILDKIT_INLINE_CACHE=1 -t "$IMG" "$W/ctx"
"$DOCKER" push "$IMG"
rm -rf testdata/buildkit-inline-cache/layout testdata/buildkit-inline-cache/image
# skopeo's dir: format keeps the manifest byte for byte (its oci: reader
# skips Docker media types in an index).
skopeo copy --src-tls-verify=false --preserve-digests "docker://$IMG" "dir:testdata/buildkit-inline-cache/image"
echo "recorded testdata/buildkit-inline-cache/image"
