#!/usr/bin/env bash
# Warm vs cold rebuild of an unchanged app on a fresh, empty dockerd (what every dind worker
# pod starts with): the second dockerd of `.ci/services`. The app: FROM the loopback registry's
# base, two `RUN sleep 4`, a COPY. Each round: the app is built once on the main daemon (which
# pushes :latest), then rebuilt on the second daemon cold (CACHE_FROM_LATEST=false) and warm
# (CACHE_FROM_LATEST=true, the default), each time after removing everything that round put
# on the second daemon, the base image included. Time = POST → final callback.
#   ROUNDS=3 bash benches/warm_rebuild.sh
#   DOCKER_BUILDKIT=true ROUNDS=3 bash benches/warm_rebuild.sh   # as in a dind pod (auto: BuildKit)
# Run after `bash .ci/services` and `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release/buildshuttle}
STATE=${BUILDSHUTTLE_TEST_STATE:-/tmp/buildshuttle-test}
SOCK2=$STATE/dockerd2/docker.sock
CB_PORT=${CB_PORT:-9331}
REG=127.0.0.1:5000
[ -x "$BIN" ] || { echo "build first: cargo build --release"; exit 1; }
DOCKER_HOST=unix://$SOCK2 docker info >/dev/null 2>&1 || { echo "the second dockerd is not running: bash .ci/services"; exit 1; }
work=$(mktemp -d /tmp/buildshuttle-warm.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "[warm] $*"; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
d2() { DOCKER_HOST=unix://$SOCK2 docker "$@"; }

python3 benches/callback_recorder.py "$CB_PORT" "$work/callbacks" & pids+=($!)
# name port docker-settings cache-from-latest
start() {
  PORT=$2 LISTEN_ADDRESS=127.0.0.1 DATA_DIR="$work/data-$1" RUST_LOG=warn \
    DOCKER_BUILD_SETTINGS="$3" CACHE_FROM_LATEST=$4 "$BIN" serve >"$work/$1.log" 2>&1 & pids+=($!)
  for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$2/octhc" >/dev/null && return; sleep 0.2; done
  cat "$work/$1.log"; exit 1
}
start main 9332 '{"socketPath":"/var/run/docker.sock"}' true
start cold 9333 "{\"socketPath\":\"$SOCK2\"}" false
start warm 9334 "{\"socketPath\":\"$SOCK2\"}" true

# port app_uuid build_number archive → seconds from POST to the final callback
build() {
  local port=$1 app_uuid=$2 n=$3 archive=$4 build_uuid t0 t1
  build_uuid=$(cat /proc/sys/kernel/random/uuid)
  printf '{"app":"warm","space":"default","app_uuid":"%s","build_uuid":"%s","build_number":%s,"sources":"data:base64,%s","gm_registry_host":"%s","gm_registry_repo":"bench","callback":"http://127.0.0.1:%s/b/%s"}' \
    "$app_uuid" "$build_uuid" "$n" "$(base64 -w0 "$archive")" "$REG" "$CB_PORT" "$build_uuid" > "$work/post.json"
  t0=$(now)
  curl -sf -X POST "http://127.0.0.1:$port/" -H 'content-type: application/json' --data-binary @"$work/post.json" >/dev/null
  until grep -q "/b/$build_uuid .*\"status\":\"\(succeeded\|failed\)\"" "$work/callbacks" 2>/dev/null; do sleep 0.02; done
  grep -q "/b/$build_uuid .*succeeded" "$work/callbacks" || { curl -s "http://127.0.0.1:$port/warm-$app_uuid/$n/logs" | tail -20 >&2; exit 1; }
  t1=$(grep "/b/$build_uuid .*\"status\":\"succeeded\"" "$work/callbacks" | cut -d' ' -f1)
  curl -sf "http://127.0.0.1:$port/warm-$app_uuid/$n/logs" > "$work/last.log"
  echo "$t1 - $t0" | bc
}
# Waits (≤ 2 s) for the build's tidy, which tags the app's `latest` on the daemon that built it
# beside the final callback: `fresh` must come after it, or a late tag would keep the image.
settled() {
  local repo=$1; shift
  for _ in $(seq 100); do "$@" image inspect "$repo:latest" >/dev/null 2>&1 && return; sleep 0.02; done
}
# Leaves the second daemon as this round found it: no image of the app, no base image.
fresh() {
  local repo=$1
  d2 images --format '{{.Repository}}:{{.Tag}}' | grep -E "^($repo|$REG/base/busybox):" | xargs -r -n1 env DOCKER_HOST=unix://$SOCK2 docker rmi -f >/dev/null 2>&1 || true
  d2 image prune -f --filter "label=app_uuid=$2" >/dev/null 2>&1 || true
  # BuildKit keeps its own cache, which removing images leaves behind.
  d2 builder prune -af >/dev/null 2>&1 || true
}

printf '%-6s %10s %10s %8s\n' round cold_s warm_s ratio
for i in $(seq 1 "$ROUNDS"); do
  app_uuid=$(cat /proc/sys/kernel/random/uuid)
  repo="$REG/bench/warm-$app_uuid"
  mkdir -p "$work/app-$i"
  printf 'FROM %s/base/busybox:1\nRUN echo round-%s-%s && sleep 4\nRUN sleep 4\nCOPY app.txt /app.txt\n' "$REG" "$i" "$app_uuid" > "$work/app-$i/Dockerfile"
  echo "unchanged" > "$work/app-$i/app.txt"
  tar -C "$work/app-$i" -czf "$work/app-$i.tgz" .
  build 9332 "$app_uuid" 1 "$work/app-$i.tgz" >/dev/null
  fresh "$repo" "$app_uuid"
  c=$(build 9333 "$app_uuid" 2 "$work/app-$i.tgz")
  settled "$repo" d2
  fresh "$repo" "$app_uuid"
  w=$(build 9334 "$app_uuid" 3 "$work/app-$i.tgz")
  settled "$repo" d2
  grep -Eq 'Using cache|^#[0-9]+ CACHED$' "$work/last.log" || { say "the warm build used no cache:"; cat "$work/last.log"; exit 1; }
  fresh "$repo" "$app_uuid"
  echo "$c" >> "$work/c"; echo "$w" >> "$work/w"
  printf '%-6s %10.3f %10.3f %8.3f\n' "$i" "$c" "$w" "$(echo "$w / $c" | bc -l)"
done
mc=$(median < "$work/c"); mw=$(median < "$work/w")
printf 'median %10.3f %10.3f %8.3f   (warm / cold, goal ≤ 0.3)\n' "$mc" "$mw" "$(echo "$mw / $mc" | bc -l)"
echo "last warm build's timings: $(grep '^Timings: ' "$work/last.log")"
