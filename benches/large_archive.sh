#!/usr/bin/env bash
# Memory bound for a large archive with S3 storage: one build whose sources are a ~1 GiB
# .tar.gz (incompressible), stored in S3 (multipart upload), then fetched back through
# GET /{build_uuid}. Prints the service's peak RSS (VmHWM) before and after, and timings.
# Not a timed test: run by hand after `bash .ci/services` and `cargo build`.
#   SIZE_MIB=1000 bash benches/large_archive.sh
#   IN_CONTEXT=1 SIZE_MIB=256 bash benches/large_archive.sh   # the big file in the build context too
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-1000}
BIN=${BIN:-target/debug/buildshuttle}
PORT=${PORT:-9310}
FILES_PORT=${FILES_PORT:-9311}
work=$(mktemp -d /tmp/buildshuttle-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "[bench] $*"; }
rss() { awk -v k="$2" '$1==k":" {print $2" "$3}' "/proc/$1/status"; }

[ -x "$BIN" ] || { echo "build first: cargo build"; exit 1; }
(exec 3<>/dev/tcp/127.0.0.1/9100) 2>/dev/null || { echo "s3s-fs is not running: bash .ci/services"; exit 1; }

say "making a ${SIZE_MIB} MiB archive"
mkdir -p "$work/src" "$work/www"
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom > "$work/src/big.bin"
printf 'FROM test/busybox:latest\nRUN echo large-archive-%s\n' "$RANDOM$RANDOM" > "$work/src/Dockerfile"
# The big file stays out of the docker context: this measures storage, not dockerd.
# IN_CONTEXT=1 keeps it in (and COPYs it): the context streamed from the archive to dockerd too.
if [ "${IN_CONTEXT:-0}" = 1 ]; then
  echo 'COPY big.bin /big.bin' >> "$work/src/Dockerfile"
else
  printf 'big.bin\n' > "$work/src/.dockerignore"
fi
tar -C "$work/src" -cf - . | gzip -1 > "$work/www/sources.tar.gz"
rm "$work/src/big.bin"
size=$(stat -c %s "$work/www/sources.tar.gz")
want=$(sha256sum "$work/www/sources.tar.gz" | cut -d' ' -f1)
say "archive: $size bytes"
(cd "$work/www" && exec python3 -m http.server "$FILES_PORT" --bind 127.0.0.1 >/dev/null 2>&1) &
pids+=($!)

PORT=$PORT LISTEN_ADDRESS=127.0.0.1 DATA_DIR="$work/data" \
  S3_BUCKET=buildshuttle-test S3_ENDPOINT=http://127.0.0.1:9100 S3_REGION=us-east-1 \
  S3_ACCESS_KEY=buildshuttle-test S3_SECRET_KEY=buildshuttle-test-secret \
  MAX_SOURCE_BYTES=$((4 << 30)) RUST_LOG=warn \
  "$BIN" serve >"$work/service.log" 2>&1 &
svc=$!
pids+=($svc)
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$PORT/octhc" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PORT/octhc" >/dev/null || { cat "$work/service.log"; exit 1; }
say "service up: RSS $(rss $svc VmRSS), peak $(rss $svc VmHWM)"

build_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
app_uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
start=$(date +%s.%N)
curl -sf -X POST "http://127.0.0.1:$PORT/" -H 'content-type: application/json' -d "{
  \"app\": \"bench\", \"space\": \"default\", \"app_uuid\": \"$app_uuid\", \"build_uuid\": \"$build_uuid\",
  \"build_number\": 1, \"sources\": \"http://127.0.0.1:$FILES_PORT/sources.tar.gz\",
  \"gm_registry_host\": \"127.0.0.1:5000\", \"gm_registry_repo\": \"bench\" }" >/dev/null
logs="http://127.0.0.1:$PORT/bench-$app_uuid/1/logs"
until curl -sf "$logs" | grep -q '^Build finished$'; do sleep 1; done
built=$(date +%s.%N)
curl -sf "$logs" | grep -E '^(Fetched|Build failed|Successfully built and pushed)' || true
say "build done in $(echo "$built - $start" | bc) s: RSS $(rss $svc VmRSS), peak $(rss $svc VmHWM)"

got=$(curl -sf "http://127.0.0.1:$PORT/$build_uuid" | sha256sum | cut -d' ' -f1)
fetched=$(date +%s.%N)
[ "$got" = "$want" ] || { say "GET /$build_uuid returned different bytes"; exit 1; }
say "GET /$build_uuid: $size bytes, identical, in $(echo "$fetched - $built" | bc) s"
say "peak RSS of the service (VmHWM): $(rss $svc VmHWM) for a $size-byte archive"
rm -f "${BUILDSHUTTLE_TEST_STATE:-/tmp/buildshuttle-test}/s3/buildshuttle-test/$build_uuid"
