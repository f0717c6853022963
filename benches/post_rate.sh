#!/usr/bin/env bash
# POST / rate and latency against GET /octhc, same server, same run (release build).
# 32 connections on loopback with wrk (Debian's); every POST is a new build (fresh
# build_uuid and build_number, see post_rate.lua) whose sources fail at once (a closed
# loopback port), no callback. GET /octhc runs first on the idle server, then POST /.
# Prints req/s and latency percentiles (p50, p90, p99, p99.9, max) side by side, the service's peak RSS (VmHWM) over the run, and
# that peak less the idle RSS per build still queued.
#   SECONDS_EACH=10 CONNECTIONS=32 bash benches/post_rate.sh
# Then both routes again at fixed rates (open loop, OPEN_RATES="2000 10000"; empty to skip).
# MAX_QUEUED_BUILDS=N (passed to the service) bounds the queue: POSTs past it are 503s, which
# the non-2xx column counts and the per-queued-build figure leaves out.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-10}
CONNECTIONS=${CONNECTIONS:-32}
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
bash .ci/services docker >/dev/null
# BIN=path/to/buildshuttle measures that binary instead of a fresh release build.
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin buildshuttle 2>&1 | tail -1
  BIN=target/release/buildshuttle
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
closed=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Every server's folder is removed at the end, not between runs: tens of thousands of files
# deleted just before a run make the next run's file creations slow on some filesystems
# (ext4 without a journal skips recently deleted inodes one by one).
pid= datas=
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf $datas' EXIT
# Starts a server on a fresh folder ($data) and waits until it answers.
start() {
  data=$(mktemp -d /tmp/post-rate.XXXXXX); datas="$datas $data"
  PORT=$port LISTEN_ADDRESS=127.0.0.1 DATA_DIR="$data" "$BIN" serve >"$data/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/octhc" >/dev/null && break; sleep 0.1; done
}
start

idle=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
run() { wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_EACH}s" "$@" | grep '^RESULT'; }
get=$(run -s benches/get_rate.lua "http://127.0.0.1:$port/octhc")
post=$(SOURCES="http://127.0.0.1:$closed/gone.tgz" run -s benches/post_rate.lua "http://127.0.0.1:$port/")
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
finished=$(wc -l <"$data/state/done.log" 2>/dev/null || echo 0)

row() { printf '%-14s %9s %8s %8s %8s %9s %8s %8s\n' "$@"; }
# One table row: a label, then the figures of a RESULT line.
result_row() {
  row "$1" "$(field "$2" rps)" "$(field "$2" p50_ms)" "$(field "$2" p90_ms)" "$(field "$2" p99_ms)" \
    "$(field "$2" p999_ms)" "$(field "$2" max_ms)" "$(field "$2" non2xx)"
}
row route "req/s" "p50 ms" "p90 ms" "p99 ms" "p99.9 ms" "max ms" "non-2xx"
result_row "GET /octhc" "$get"
result_row "POST /" "$post"
echo "POST requests sent: $(field "$post" requests) (socket errors: $(field "$post" errors))"
echo "builds accepted: $(( $(field "$post" requests) - $(field "$post" non2xx) )), finished when wrk stopped: $finished (the rest were still queued)"
echo "peak RSS (VmHWM) of the service over the run: $((hwm / 1024)) MiB (idle before it: $((idle / 1024)) MiB)"
queued=$(( $(field "$post" requests) - $(field "$post" non2xx) - finished ))
[ "$queued" -gt 0 ] && echo "memory per queued build at the peak: $(( (hwm - idle) * 1024 / queued )) bytes ($queued queued when wrk stopped)"

# The same two routes at the same offered load: an open loop (benches/open-loop) sends
# OPEN_RATES requests a second on CONNECTIONS connections, on a fresh server for each rate,
# latency counted from each request's scheduled time. wrk's closed loop above offers a route
# as many requests as it can answer, so there the dearer route also waits longer in line.
OPEN_RATES=${OPEN_RATES-2000 10000}
[ -n "$OPEN_RATES" ] || exit 0
kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
cargo build -q --release -p open-loop
echo
echo "open loop, $CONNECTIONS connections, ${SECONDS_EACH}s each, a fresh server per rate:"
row "route @ rate" "req/s" "p50 ms" "p90 ms" "p99 ms" "p99.9 ms" "max ms" "non-2xx"
for rate in $OPEN_RATES; do
  start
  open() { target/release/open-loop "127.0.0.1:$port" "$1" "$rate" "$SECONDS_EACH" "$CONNECTIONS" \
    "http://127.0.0.1:$closed/gone.tgz" 2>/dev/null | grep '^RESULT'; }
  get=$(open octhc); post=$(open post)
  result_row "octhc @ $rate" "$get"
  result_row "post @ $rate" "$post"
  echo "  (the load generator woke late by p99 $(field "$get" late_p99_ms) / $(field "$post" late_p99_ms) ms; socket errors $(field "$get" errors) / $(field "$post" errors))"
  kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
done
