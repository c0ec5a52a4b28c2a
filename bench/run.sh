#!/usr/bin/env bash
# kiln vs BuildKit (Docker 20.10's) vs buildah, same machine, same run.
# Usage: bench/run.sh [--smoke]   (ROUNDS=N to change the number of rounds)
# Prints a markdown table (median wall time per builder and ratios) and
# writes it to bench/results.md. Everything it starts, it stops.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
ROUNDS=${ROUNDS:-$([ $SMOKE = 1 ] && echo 1 || echo 3)}
SMALL_FILES=$([ $SMOKE = 1 ] && echo 500 || echo 20000)
TRIVIAL_RUNS=$([ $SMOKE = 1 ] && echo 5 || echo 50)
CONCURRENT=$([ $SMOKE = 1 ] && echo 3 || echo 20)
BIG_MB=$([ $SMOKE = 1 ] && echo 16 || echo 1024)

need=()
for pkg in buildah docker.io busybox-static runc docker-registry curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Smoke mode reuses the debug build the tests made (it checks that the harness runs, not speed).
PROFILE=$([ $SMOKE = 1 ] && echo debug || echo release)
if [ $PROFILE = release ]; then cargo build --release -q -p kilnd -p kilnctl || exit 1; else cargo build -q -p kilnd -p kilnctl || exit 1; fi
# The codec ceiling is always measured optimised: it is the reference, not kiln.
cargo build --release -q -p kiln-compress --example codec_limit || exit 1
CODEC_LIMIT=$REPO/target/release/examples/codec_limit
KILND=$REPO/target/$PROFILE/kilnd
KILNCTL=$REPO/target/$PROFILE/kilnctl

W=$(mktemp -d /tmp/kiln-bench.XXXXXX)
# The 1 GB cases keep several copies of the layer (context, snapshots, blobs,
# each builder's outputs): a full disk turns them into failures.
AVAIL_MB=$(( $(df --output=avail -k "$W" | tail -1) / 1024 )); NEED_MB=$(( BIG_MB * 12 ))
[ "$AVAIL_MB" -lt "$NEED_MB" ] && echo "note: $AVAIL_MB MB free under $W; the $BIG_MB MB cases need about $NEED_MB MB" >&2
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  # Time to stop cleanly (kilnd unmounts its secrets tmpfs on the way out;
  # a SIGKILL leaves it mounted), then whatever is left is killed.
  for _ in $(seq 150); do
    alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  umount -R "$W"/docker/root/overlay2/*/merged 2>/dev/null
  buildah --root "$W/buildah/root" --runroot "$W/buildah/run" rm --all >/dev/null 2>&1
  umount -R "$W"/buildah/root/overlay 2>/dev/null
  rm -rf "$W" 2>/dev/null
}
trap cleanup EXIT

# Microseconds from bash itself: forking `date` twice per sample cost ~2 ms,
# which landed in every builder's time and swamped the few-ms cases.
# A helper called as $(helper) would fork too, so the expansions are
# written out where they are used: t0 in µs, elapsed ms printed.

# --- peers -------------------------------------------------------------------
"$KILND" --root "$W/kiln" --addr "unix://$W/kilnd.sock" --log-level warn 2>"$W/kilnd.log" &
KILND_PID=$!; PIDS+=("$KILND_PID")
for _ in $(seq 100); do [ -S "$W/kilnd.sock" ] && break; sleep 0.05; done
KILN_IDLE_RSS=$(awk '/VmRSS/{print $2}' /proc/$KILND_PID/status)
# The same daemon with runc as its OCI runtime, for the per-RUN case.
"$KILND" --root "$W/kiln-runc" --addr "unix://$W/kilnd-runc.sock" --oci-runtime runc --log-level warn 2>"$W/kilnd-runc.log" &
PIDS+=("$!")
for _ in $(seq 100); do [ -S "$W/kilnd-runc.sock" ] && break; sleep 0.05; done

HAVE_DOCKER=0
DOCKER=/usr/bin/docker
if [ -x /usr/sbin/dockerd ] && [ -x $DOCKER ]; then
  mkdir -p "$W/docker"
  /usr/sbin/dockerd -H "unix://$W/docker.sock" --data-root "$W/docker/root" --exec-root "$W/docker/exec" \
    --pidfile "$W/docker.pid" --iptables=false --bridge=none --storage-driver=overlay2 >"$W/dockerd.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 100); do DOCKER_HOST="unix://$W/docker.sock" $DOCKER info >/dev/null 2>&1 && { HAVE_DOCKER=1; break; }; sleep 0.2; done
fi
[ $HAVE_DOCKER = 1 ] || echo "note: dockerd did not start; BuildKit columns are n/a ($W/dockerd.log)" >&2
# A local registry for the push cases.
REG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$REG_PORT
printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' "$W/registry" "$REG" > "$W/registry.yml"
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$REG_PORT) 2>/dev/null && break; sleep 0.1; done
HAVE_BUILDAH=0
command -v buildah >/dev/null && HAVE_BUILDAH=1
BUILDAH=(buildah --root "$W/buildah/root" --runroot "$W/buildah/run" --storage-driver overlay)

# --- builders: build CTX [extra] -> prints ms ------------------------------------
kiln_build() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$1" --progress quiet >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
kiln_cold() { "$KILNCTL" --addr "unix://$W/kilnd.sock" prune -f --all >/dev/null 2>&1; }
kilnrunc_build() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd-runc.sock" build "$1" --progress quiet >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
kilnrunc_cold() { "$KILNCTL" --addr "unix://$W/kilnd-runc.sock" prune -f --all >/dev/null 2>&1; }
# Case 8 needs the network for apt-get: BuildKit steps get the host's.
bk_build_net() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=1 $DOCKER build --network=host -q "$1" >/dev/null 2>>"$W/bk.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bh_build_net() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "${BUILDAH[@]}" bud --layers --jobs 3 --isolation chroot --tls-verify=false -q -t bench8 "$1" >/dev/null 2>>"$W/buildah.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bk_build() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=1 $DOCKER build --network=none -q "$1" >/dev/null 2>>"$W/bk.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bk_cold() { DOCKER_HOST="unix://$W/docker.sock" $DOCKER builder prune -af >/dev/null 2>&1; DOCKER_HOST="unix://$W/docker.sock" $DOCKER image prune -af >/dev/null 2>&1; }
bh_build() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "${BUILDAH[@]}" bud --layers --jobs 3 --isolation chroot -q -t bench "$1" >/dev/null 2>>"$W/buildah.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bh_cold() { "${BUILDAH[@]}" rmi --all --force >/dev/null 2>&1; }

# Registry-base variants: the build, then the image exported as an OCI tar or pushed.
# BuildKit in Docker 20.10 has no OCI-tar output for `docker build`: docker save of the built image.
kiln_oci_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$1" --progress quiet -o "type=oci,dest=$W/out-kiln.tar" >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bk_oci_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; { DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=1 $DOCKER build --network=none -q -t bench-out "$1" && DOCKER_HOST="unix://$W/docker.sock" $DOCKER save -o "$W/out-bk.tar" bench-out; } >/dev/null 2>>"$W/bk.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bh_oci_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; { "${BUILDAH[@]}" bud --layers --jobs 3 --isolation chroot --tls-verify=false -q -t bench-out "$1" && rm -f "$W/out-bh.tar" && "${BUILDAH[@]}" push -q bench-out "oci-archive:$W/out-bh.tar"; } >/dev/null 2>>"$W/buildah.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
kiln_push_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$1" --progress quiet -t "$REG/out/kiln:1" --push --provenance=false >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bk_push_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; { DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=1 $DOCKER build --network=none -q -t "$REG/out/bk:1" "$1" && DOCKER_HOST="unix://$W/docker.sock" $DOCKER push -q "$REG/out/bk:1"; } >/dev/null 2>>"$W/bk.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bh_push_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; { "${BUILDAH[@]}" bud --layers --jobs 3 --isolation chroot --tls-verify=false -q -t bench-out "$1" && "${BUILDAH[@]}" push -q --tls-verify=false bench-out "docker://$REG/out/bh:1"; } >/dev/null 2>>"$W/buildah.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
# buildah pulls from the plain-HTTP local registry only with --tls-verify=false.
bh_build_reg() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "${BUILDAH[@]}" bud --layers --jobs 3 --isolation chroot --tls-verify=false -q -t bench "$1" >/dev/null 2>>"$W/buildah.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
kiln_build_reg() { kiln_build "$@"; }
bk_build_reg() { bk_build "$@"; }

# --- contexts --------------------------------------------------------------------
BASE='FROM scratch AS busybox
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
'
mkctx() { # name dockerfile-body
  mkdir -p "$W/ctx/$1"; cp /bin/busybox "$W/ctx/$1/busybox"; printf '%s\n%s\n' "$BASE" "$2" > "$W/ctx/$1/Dockerfile"; echo "$W/ctx/$1"
}
STEPS='FROM busybox
ENV APP=/app MODE=bench
WORKDIR /app
COPY src/ /app/src/
RUN echo built > /app/built
RUN mkdir -p /app/data && echo 1 > /app/data/one
COPY config.txt /app/
RUN cat /app/config.txt > /app/config.copy
ENV READY=1
RUN ls /app > /app/listing
RUN echo done > /app/done'
SINGLE=$(mkctx single "$STEPS")
mkdir -p "$SINGLE/src"; for i in $(seq 20); do echo "file $i" > "$SINGLE/src/f$i.txt"; done; echo cfg > "$SINGLE/config.txt"
# 2b reads the whole context (COPY many/), so the no-op rebuild measures a
# full resync of SMALL_FILES files, not just the few files case 1 reads.
BIG=$(mkctx bigctx "$STEPS
COPY many/ /many/")
mkdir -p "$BIG/src" "$BIG/many"; echo cfg > "$BIG/config.txt"; for i in $(seq 20); do echo "file $i" > "$BIG/src/f$i.txt"; done
( cd "$BIG/many" && for d in $(seq 0 $(( SMALL_FILES / 100 - 1 ))); do mkdir -p d$d; for f in $(seq 100); do echo $d$f > d$d/f$f; done; done )
# A fixed amount of CPU work, calibrated to about 2 s on one core here.
calib_n=200000
t0=${EPOCHREALTIME//[!0-9]/}; /bin/busybox sh -c "i=0; while [ \$i -lt $calib_n ]; do i=\$((i+1)); done"; t1=${EPOCHREALTIME//[!0-9]/}
SPIN_N=$(( calib_n * 2000000 / ( (t1 - t0) > 0 ? (t1 - t0) : 1 ) ))
SPIN="i=0; while [ \$i -lt $SPIN_N ]; do i=\$((i+1)); done"
PAR=$(mkctx parallel "FROM busybox AS a
RUN $SPIN; echo a > /a
FROM busybox AS b
RUN $SPIN; echo b > /b
FROM busybox AS c
RUN $SPIN; echo c > /c
FROM busybox
COPY --from=a /a /a
COPY --from=b /b /b
COPY --from=c /c /c")
TRIV_BODY="FROM busybox"; for i in $(seq "$TRIVIAL_RUNS"); do TRIV_BODY="$TRIV_BODY
RUN true # $i"; done
TRIV=$(mkctx trivial "$TRIV_BODY")
# The same build with one RUN: case 6 minus this, over the extra steps, is the per-RUN cost.
TRIV1=$(mkctx trivial1 "FROM busybox
RUN true # 1")
# 5: a big context (one BIG_MB file + the small files); 7: a BIG_MB layer.
# Base64 of random bytes: compresses about as well as typical binaries.
head -c $(( BIG_MB * 1024 * 1024 * 3 / 4 )) /dev/urandom | base64 -w 76 > "$W/big.dat"
BIG_BYTES=$(stat -c %s "$W/big.dat")
HUGE=$(mkctx hugectx "$STEPS")
cp -r "$BIG/src" "$BIG/many" "$BIG/config.txt" "$HUGE/"; cp "$W/big.dat" "$HUGE/big.dat"
LAYER=$W/ctx/layer; mkdir -p "$LAYER"; cp "$W/big.dat" "$LAYER/big.dat"; printf 'FROM scratch\nCOPY big.dat /big.dat\n' > "$LAYER/Dockerfile"

declare -A RES
record() { RES["$1|$2"]="${RES["$1|$2"]:-} $3"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END{ if (NR==0) print ""; else if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }

builders=(kiln)
[ $HAVE_DOCKER = 1 ] && builders+=(bk)
[ $HAVE_BUILDAH = 1 ] && builders+=(bh)

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  for b in "${builders[@]}"; do
    "${b}_cold"; record "1 cold, 10 steps" $b "$("${b}_build" "$SINGLE")"
    record "2 no-op rebuild" $b "$("${b}_build" "$SINGLE")"
    echo "edit $round" >> "$SINGLE/config.txt"
    record "3 incremental (one COPY'd file)" $b "$("${b}_build" "$SINGLE")"
    "${b}_build" "$BIG" >/dev/null
    record "2b no-op rebuild, $SMALL_FILES-file context (all read)" $b "$("${b}_build" "$BIG")"
    "${b}_cold"; record "4 3 parallel stages x 2s CPU (ideal on $(nproc) cores: $(( 2000 * 3 / $(nproc) > 2000 ? 2000 * 3 / $(nproc) : 2000 )) ms)" $b "$("${b}_build" "$PAR")"
    "${b}_cold"; record "6 $TRIVIAL_RUNS x RUN true, cold" $b "$("${b}_build" "$TRIV")"
    "${b}_cold"; record "6a 1 x RUN true, cold" $b "$("${b}_build" "$TRIV1")"
    if [ "$b" = kiln ]; then
      kilnrunc_cold; record "6r $TRIVIAL_RUNS x RUN true, cold (kiln with runc)" kiln "$(kilnrunc_build "$TRIV")"
      kilnrunc_cold; record "6ra 1 x RUN true, cold (kiln with runc)" kiln "$(kilnrunc_build "$TRIV1")"
    fi
    # 9: concurrent builds of different small Dockerfiles on one daemon.
    for i in $(seq "$CONCURRENT"); do [ -d "$W/ctx/conc$i" ] || mkctx "conc$i" "FROM busybox
RUN echo $i > /n$i" >/dev/null; done
    t0=${EPOCHREALTIME//[!0-9]/}
    jobs_=()
    for i in $(seq "$CONCURRENT"); do "${b}_build" "$W/ctx/conc$i" >/dev/null & jobs_+=("$!"); done
    wait "${jobs_[@]}"
    record "9 $CONCURRENT concurrent builds" $b $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 ))
    "${b}_cold"; record "5 $BIG_MB MB + $SMALL_FILES-file context (reads 21 files), first build" $b "$("${b}_build" "$HUGE")"
    record "5b same context unchanged, rebuild" $b "$("${b}_build" "$HUGE")"
  done
done

# --- 12: FROM an image in the local registry, as users build: cold, no-op,
# one file changed, and no-op builds that export an OCI tar or push every time.
"$KILNCTL" --addr "unix://$W/kilnd.sock" build "$(mkctx regbase '')" --target busybox -t "$REG/busybox:latest" --push \
  --provenance=false --progress quiet >/dev/null 2>>"$W/kiln.err" || echo "FAIL pushing the base" >&2
mkplain() { mkdir -p "$W/ctx/$1"; printf '%s\n' "$2" > "$W/ctx/$1/Dockerfile"; echo "$W/ctx/$1"; }
REGSTEPS=$(mkplain regsteps "FROM $REG/busybox:latest${STEPS#FROM busybox}")
cp -r "$SINGLE/src" "$SINGLE/config.txt" "$REGSTEPS/"
REGPAR=$(mkplain regpar "FROM $REG/busybox:latest AS a
RUN sleep 2; echo a > /a
FROM $REG/busybox:latest AS b
RUN sleep 2; echo b > /b
FROM $REG/busybox:latest AS c
RUN sleep 2; echo c > /c
FROM $REG/busybox:latest
COPY --from=a /a /a
COPY --from=b /b /b
COPY --from=c /c /c")
REG_CASES=("12a registry base: cold, 10 steps" "12b registry base: no-op rebuild" "12c registry base: one COPY'd file changed" "12d registry base: no-op, exported as an OCI tar (BuildKit: + docker save)" "12e registry base: one file changed, exported as an OCI tar" "12f registry base: no-op, pushed" "12g registry base: 3 parallel stages x sleep 2, cold (ideal 2000 ms)")
for round in $(seq "$ROUNDS"); do
  echo "registry-base round $round/$ROUNDS" >&2
  for b in "${builders[@]}"; do
    "${b}_cold"; record "${REG_CASES[0]}" $b "$("${b}_build_reg" "$REGSTEPS")"
    record "${REG_CASES[1]}" $b "$("${b}_build_reg" "$REGSTEPS")"
    echo "reg edit $round" >> "$REGSTEPS/config.txt"
    record "${REG_CASES[2]}" $b "$("${b}_build_reg" "$REGSTEPS")"
    "${b}_oci_out" "$REGSTEPS" >/dev/null
    record "${REG_CASES[3]}" $b "$("${b}_oci_out" "$REGSTEPS")"
    echo "reg edit oci $round" >> "$REGSTEPS/config.txt"
    record "${REG_CASES[4]}" $b "$("${b}_oci_out" "$REGSTEPS")"
    "${b}_push_out" "$REGSTEPS" >/dev/null
    record "${REG_CASES[5]}" $b "$("${b}_push_out" "$REGSTEPS")"
    "${b}_cold"; record "${REG_CASES[6]}" $b "$("${b}_build_reg" "$REGPAR")"
  done
done

# --- 9b: memory under load: a fresh daemon, CONC_MIXED concurrent builds of different
# Dockerfiles from the registry base (RUN, COPY, ENV, a second stage); peak RSS.
CONC_MIXED=$([ $SMOKE = 1 ] && echo 5 || echo 50)
"$KILND" --root "$W/kiln-load" --addr "unix://$W/kilnd-load.sock" --log-level warn 2>"$W/kilnd-load.log" &
LOAD_PID=$!; PIDS+=("$LOAD_PID")
for _ in $(seq 100); do [ -S "$W/kilnd-load.sock" ] && break; sleep 0.05; done
sleep 1
LOAD_IDLE_RSS=$(awk '/VmRSS/{print $2}' /proc/$LOAD_PID/status)
for i in $(seq "$CONC_MIXED"); do
  c=$(mkplain "mixed$i" "FROM $REG/busybox:latest AS tool
RUN echo tool $i > /tool
FROM $REG/busybox:latest
ENV N=$i
WORKDIR /w
COPY f.txt /w/
COPY --from=tool /tool /w/tool
RUN cat /w/f.txt /w/tool > /w/out && echo \$N >> /w/out")
  echo "file $i" > "$c/f.txt"
done
t0=${EPOCHREALTIME//[!0-9]/}
jobs_=()
for i in $(seq "$CONC_MIXED"); do "$KILNCTL" --addr "unix://$W/kilnd-load.sock" build "$W/ctx/mixed$i" --progress quiet >/dev/null 2>>"$W/kiln.err" & jobs_+=("$!"); done
wait "${jobs_[@]}"
LOAD_MS=$(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 ))
LOAD_PEAK_RSS=$(awk '/VmHWM/{print $2}' /proc/$LOAD_PID/status)

# --- 8: Debian base (debootstrap), RUN apt-get install; full mode only -------
DEB_CASE="8 Debian: apt-get install hello"
if [ $SMOKE = 0 ]; then
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  if debootstrap --variant=minbase bookworm "$W/debian" http://deb.debian.org/debian >"$W/debootstrap.log" 2>&1; then
    mkdir -p "$W/ctx/debbase"; echo 'FROM debian' > "$W/ctx/debbase/Dockerfile"
    "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$W/ctx/debbase" --build-context "debian=$W/debian" \
      -t "$REG/debian:bookworm" --push --progress quiet >/dev/null 2>>"$W/kiln.err"
    mkdir -p "$W/ctx/apt"; printf 'FROM %s/debian:bookworm\nRUN apt-get update -q && apt-get install -y -q --no-install-recommends hello\n' "$REG" > "$W/ctx/apt/Dockerfile"
    for round in $(seq "$ROUNDS"); do
      echo "debian round $round/$ROUNDS" >&2
      for b in "${builders[@]}"; do
        build=${b}_build; [ "$b" != kiln ] && build=${b}_build_net
        "${b}_cold"; record "$DEB_CASE, cold" $b "$("$build" "$W/ctx/apt")"
        record "$DEB_CASE, warm" $b "$("$build" "$W/ctx/apt")"
      done
    done
  else
    echo "note: debootstrap failed, case 8 skipped ($W/debootstrap.log)" >&2
  fi
fi

# --- 10: the cache through a registry: kiln's --cache-to/--cache-from (mode=max) vs
# BuildKit's inline cache (docker build --build-arg BUILDKIT_INLINE_CACHE=1 + push; an
# empty builder with --cache-from). Times are whole builds, export or import included.
"$KILND" --root "$W/kiln-b" --addr "unix://$W/kilnd-b.sock" --log-level warn 2>"$W/kilnd-b.log" &
PIDS+=("$!")
for _ in $(seq 100); do [ -S "$W/kilnd-b.sock" ] && break; sleep 0.05; done
CACHE_CTX=$(mkctx cachectx "$STEPS")
cp -r "$SINGLE/src" "$SINGLE/config.txt" "$CACHE_CTX/"
kiln_cache_to() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$CACHE_CTX" --progress quiet --cache-to "type=registry,ref=$REG/cache/kiln:1,mode=max" >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
kiln_cache_from() { "$KILNCTL" --addr "unix://$W/kilnd-b.sock" prune -f --all >/dev/null 2>&1; local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd-b.sock" build "$CACHE_CTX" --progress quiet --cache-from "type=registry,ref=$REG/cache/kiln:1" >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bk_cache_to() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=1 $DOCKER build --network=none -q --build-arg BUILDKIT_INLINE_CACHE=1 -t "$REG/cache/bk:1" "$CACHE_CTX" >/dev/null 2>>"$W/bk.err" && DOCKER_HOST="unix://$W/docker.sock" $DOCKER push -q "$REG/cache/bk:1" >/dev/null 2>>"$W/bk.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
bk_cache_from() { bk_cold; local t0; t0=${EPOCHREALTIME//[!0-9]/}; DOCKER_HOST="unix://$W/docker.sock" DOCKER_BUILDKIT=1 $DOCKER build --network=none -q --cache-from "$REG/cache/bk:1" "$CACHE_CTX" >/dev/null 2>>"$W/bk.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
cache_builders=(kiln); [ $HAVE_DOCKER = 1 ] && cache_builders+=(bk)
for round in $(seq "$ROUNDS"); do
  echo "cache round $round/$ROUNDS" >&2
  for b in "${cache_builders[@]}"; do
    "${b}_cache_to" >/dev/null
    record "10a cache export, unchanged build" $b "$("${b}_cache_to")"
    record "10c cache import into an empty builder, unchanged build" $b "$("${b}_cache_from")"
    echo "cache edit $b $round" >> "$CACHE_CTX/config.txt"
    record "10d cache import into an empty builder, one file changed" $b "$("${b}_cache_from")"
    record "10b cache export, one file changed" $b "$("${b}_cache_to")"
  done
done

# --- 11: what provenance costs kiln (BuildKit 0.8 in Docker 20.10 makes none): the
# 10-step build, cold, exported as an OCI tar, without and with --provenance mode=max.
kiln_oci() { kiln_cold; local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$SINGLE" --progress quiet -o "type=oci,dest=$W/p.tar" "$@" >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
for round in $(seq "$ROUNDS"); do
  record "11a cold, 10 steps, -o type=oci" kiln "$(kiln_oci)"
  record "11b the same with --provenance mode=max" kiln "$(kiln_oci --provenance mode=max)"
  record "11e the same with --provenance mode=max --sbom=true" kiln "$(kiln_oci --provenance mode=max --sbom=true)"
  if [ -x "$W/debian/bin/sh" ] 2>/dev/null && [ -d "$W/ctx/apt" ]; then
    t0=${EPOCHREALTIME//[!0-9]/}; kiln_cold; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$W/ctx/apt" --progress quiet -o "type=oci,dest=$W/p.tar" >/dev/null 2>>"$W/kiln.err"; record "11c Debian apt-get install hello, cold, -o type=oci" kiln $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 ))
    t0=${EPOCHREALTIME//[!0-9]/}; kiln_cold; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$W/ctx/apt" --progress quiet -o "type=oci,dest=$W/p.tar" --provenance mode=max >/dev/null 2>>"$W/kiln.err"; record "11d the same with --provenance mode=max" kiln $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 ))
    t0=${EPOCHREALTIME//[!0-9]/}; kiln_cold; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$W/ctx/apt" --progress quiet -o "type=oci,dest=$W/p.tar" --provenance mode=max --sbom=true >/dev/null 2>>"$W/kiln.err"; record "11f the same with --provenance mode=max --sbom=true" kiln $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 ))
  fi
done

KILN_PEAK_RSS=$(awk '/VmHWM/{print $2}' /proc/$KILND_PID/status)
# --- 7: export and push throughput of one BIG_MB layer (MB/s of uncompressed layer) ---
mbps() { awk -v b="$BIG_BYTES" -v ms="$1" 'BEGIN{ if (ms > 0) printf "%.0f", b / 1e6 / (ms / 1000); }'; }
declare -A TP
tp() { TP["$1|$2"]="${TP["$1|$2"]:-} $3"; }
kiln_out() { local t0; t0=${EPOCHREALTIME//[!0-9]/}; "$KILNCTL" --addr "unix://$W/kilnd.sock" build "$LAYER" --progress quiet -o "$1" >/dev/null 2>>"$W/kiln.err" && echo $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )) || echo FAIL >&2; }
"$KILNCTL" --addr "unix://$W/kilnd.sock" build "$LAYER" --progress quiet >/dev/null 2>>"$W/kiln.err"
if [ $HAVE_BUILDAH = 1 ]; then "${BUILDAH[@]}" bud --layers --isolation chroot -q -t layer "$LAYER" >/dev/null 2>>"$W/buildah.err"; fi
for round in $(seq "$ROUNDS"); do
  echo "throughput round $round/$ROUNDS" >&2
  for c in gzip zstd; do
    # force-compression: compress every time (kiln otherwise reuses the blob it made before).
    tp "export to OCI tar, $c" kiln "$(mbps "$(kiln_out "type=oci,dest=$W/k.tar,compression=$c,force-compression=true")")"
    tp "push to local registry, $c" kiln "$(mbps "$(kiln_out "type=image,name=$REG/bench/k-$c-$round:1,push=true,compression=$c,force-compression=true")")"
    if [ $HAVE_BUILDAH = 1 ]; then
      # A failed push records nothing (its time would read as a huge rate).
      t0=${EPOCHREALTIME//[!0-9]/}; "${BUILDAH[@]}" push -q --compression-format "$c" layer "oci-archive:$W/b.tar" >/dev/null 2>>"$W/buildah.err" \
        && tp "export to OCI tar, $c" bh "$(mbps $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )))" || echo "FAIL buildah export" >&2
      t0=${EPOCHREALTIME//[!0-9]/}; "${BUILDAH[@]}" push -q --tls-verify=false --compression-format "$c" layer "docker://$REG/bench/b-$c-$round:1" >/dev/null 2>>"$W/buildah.err" \
        && tp "push to local registry, $c" bh "$(mbps $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )))" || echo "FAIL buildah push" >&2
    fi
    rm -f "$W/k.tar" "$W/b.tar"
  done
done
KILN_EXPORT_RSS=$(awk '/VmHWM/{print $2}' /proc/$KILND_PID/status)
LIMITS=$("$CODEC_LIMIT" "$W/big.dat")
# What the local registry itself takes in: one monolithic PUT of the big file by curl
# (MB/s of bytes received). A push cannot beat it; it shares the machine's 2 cores with kiln.
REG_INGEST=""
if command -v curl >/dev/null; then
  big_digest=sha256:$(sha256sum "$W/big.dat" | cut -d' ' -f1)
  loc=$(curl -s -o /dev/null -D - -X POST "http://$REG/v2/bench/ingest/blobs/uploads/" | awk 'tolower($1)=="location:"{print $2}' | tr -d '\r')
  case "$loc" in http*) ;; *) loc="http://$REG$loc";; esac
  sep='?'; case "$loc" in *\?*) sep='&';; esac
  t0=${EPOCHREALTIME//[!0-9]/}
  if curl -sf -o /dev/null -H 'Content-Type: application/octet-stream' -T "$W/big.dat" "$loc${sep}digest=$big_digest"; then
    REG_INGEST=$(mbps $(( (${EPOCHREALTIME//[!0-9]/} - t0) / 1000 )))
  fi
fi

OUT=bench/results$([ $SMOKE = 1 ] && echo -smoke).md
{
  echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB, $(uname -r); rounds: $ROUNDS$([ $SMOKE = 1 ] && echo ' (smoke: small sizes)')."
  echo "BuildKit: Docker $(DOCKER_HOST="unix://$W/docker.sock" $DOCKER version --format '{{.Server.Version}}' 2>/dev/null || echo n/a) (DOCKER_BUILDKIT=1); buildah: $(buildah --version 2>/dev/null | awk '{print $3}') (--layers --jobs 3 --isolation chroot)."
  echo
  echo "| case | kiln ms | BuildKit ms | buildah ms | kiln/BuildKit | kiln/buildah |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  for c in "1 cold, 10 steps" "2 no-op rebuild" "2b no-op rebuild, $SMALL_FILES-file context (all read)" "3 incremental (one COPY'd file)" "4 3 parallel stages x 2s CPU (ideal on $(nproc) cores: $(( 2000 * 3 / $(nproc) > 2000 ? 2000 * 3 / $(nproc) : 2000 )) ms)" "5 $BIG_MB MB + $SMALL_FILES-file context (reads 21 files), first build" "5b same context unchanged, rebuild" "6 $TRIVIAL_RUNS x RUN true, cold" "6r $TRIVIAL_RUNS x RUN true, cold (kiln with runc)" "$DEB_CASE, cold" "$DEB_CASE, warm" "9 $CONCURRENT concurrent builds" "10a cache export, unchanged build" "10b cache export, one file changed" "10c cache import into an empty builder, unchanged build" "10d cache import into an empty builder, one file changed" "11a cold, 10 steps, -o type=oci" "11b the same with --provenance mode=max" "11e the same with --provenance mode=max --sbom=true" "11c Debian apt-get install hello, cold, -o type=oci" "11d the same with --provenance mode=max" "11f the same with --provenance mode=max --sbom=true" "${REG_CASES[@]}"; do
    peer="$c"; [[ "$c" == 6r* ]] && peer="6 $TRIVIAL_RUNS x RUN true, cold"  # the peers' per-RUN case is the same build
    k=$(echo "${RES["$c|kiln"]:-}" | median); bk=$(echo "${RES["$peer|bk"]:-}" | median); bh=$(echo "${RES["$peer|bh"]:-}" | median)
    r1=n/a; r2=n/a
    [ -n "$k" ] && [ -n "$bk" ] && [ "$bk" -gt 0 ] && r1=$(awk -v a="$k" -v b="$bk" 'BEGIN{printf "%.2f", a/b}')
    [ -n "$k" ] && [ -n "$bh" ] && [ "$bh" -gt 0 ] && r2=$(awk -v a="$k" -v b="$bh" 'BEGIN{printf "%.2f", a/b}')
    echo "| $c | ${k:-n/a} | ${bk:-n/a} | ${bh:-n/a} | $r1 | $r2 |"
  done
  per_run() { # many-steps-case one-step-case builder
    local m o; m=$(echo "${RES["$1|$3"]:-}" | median); o=$(echo "${RES["$2|$3"]:-}" | median)
    [ -n "$m" ] && [ -n "$o" ] && awk -v m="$m" -v o="$o" -v n="$TRIVIAL_RUNS" 'BEGIN{printf "%.1f", (m-o)/(n-1)}' || echo n/a
  }
  echo
  echo "Per-RUN overhead (case 6 minus the same build with one RUN, per extra step, ms): kiln $(per_run "6 $TRIVIAL_RUNS x RUN true, cold" "6a 1 x RUN true, cold" kiln), kiln with runc $(per_run "6r $TRIVIAL_RUNS x RUN true, cold (kiln with runc)" "6ra 1 x RUN true, cold (kiln with runc)" kiln), BuildKit $(per_run "6 $TRIVIAL_RUNS x RUN true, cold" "6a 1 x RUN true, cold" bk), buildah $(per_run "6 $TRIVIAL_RUNS x RUN true, cold" "6a 1 x RUN true, cold" bh)."
  echo
  echo "7: one $BIG_MB MB layer, MB/s of uncompressed layer (median). The codec limit is sha256 + compression + sha256 on all cores with kiln's libraries, from memory-cached input."
  echo
  echo "| case | kiln MB/s | buildah MB/s | kiln/buildah | codec limit MB/s | kiln/limit |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  for c in gzip zstd; do
    lim=$(echo "$LIMITS" | awk -v c="$c" '$1==c{print $2}')
    for what in "export to OCI tar, $c" "push to local registry, $c"; do
      k=$(echo "${TP["$what|kiln"]:-}" | median); bh=$(echo "${TP["$what|bh"]:-}" | median)
      r1=n/a; r2=n/a
      [ -n "$k" ] && [ -n "$bh" ] && [ "$bh" -gt 0 ] && r1=$(awk -v a="$k" -v b="$bh" 'BEGIN{printf "%.2f", a/b}')
      [ -n "$k" ] && [ -n "$lim" ] && [ "$lim" -gt 0 ] && r2=$(awk -v a="$k" -v b="$lim" 'BEGIN{printf "%.2f", a/b}')
      echo "| $what | ${k:-n/a} | ${bh:-n/a} | $r1 | ${lim:-n/a} | $r2 |"
    done
  done
  [ -n "$REG_INGEST" ] && { echo; echo "Local registry ingest (curl, one PUT of the uncompressed $BIG_MB MB file): $REG_INGEST MB/s."; }
  echo
  echo "kilnd RSS: idle $((KILN_IDLE_RSS / 1024)) MB, peak during builds $((KILN_PEAK_RSS / 1024)) MB, peak after the $BIG_MB MB exports and pushes $((KILN_EXPORT_RSS / 1024)) MB."
  echo "kilnd under load (9b, a fresh daemon): $CONC_MIXED concurrent mixed builds from the registry base in $LOAD_MS ms; RSS idle $((LOAD_IDLE_RSS / 1024)) MB, peak $((LOAD_PEAK_RSS / 1024)) MB."
  echo "kiln keeps results in its cache (no export); BuildKit and buildah store an image."
  echo "10: kiln exports and imports its registry cache (mode=max); BuildKit builds with inline cache and pushes the image (export), or builds on an empty builder with --cache-from the pushed image (import)."
  echo "12: every builder starts FROM the same image in the local registry (pushed by kiln). 12d/12e: kiln -o type=oci, BuildKit docker build + docker save, buildah bud + push oci-archive; 12f: kiln --push, BuildKit docker build + docker push, buildah bud + push."
  echo "11: kiln alone (Docker 20.10's BuildKit makes no provenance): 11b minus 11a (11d minus 11c) is what --provenance mode=max costs, 11e minus 11b (11f minus 11d) what --sbom=true adds."
  if grep -qv WARNING "$W/kiln.err" 2>/dev/null; then echo; echo "kiln errors:"; grep -v WARNING "$W/kiln.err" | head -5 | sed 's/^/    /'; fi
} > "$OUT"
cat "$OUT"
grep -q FAIL "$W/kiln.err" 2>/dev/null && exit 1
exit 0
