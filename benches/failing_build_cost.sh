#!/usr/bin/env bash
# CPU time per build whose sources fail at once (a closed loopback port), measured while
# the queue a burst of `POST /` left behind drains: the service's own CPU (user + system,
# /proc/PID/stat) and the whole machine's busy time, per build finished in the window.
# It is what each build of post_rate.sh's burst costs beside the POSTs.
#   bash benches/failing_build_cost.sh                       # the release binary, 3 rounds
#   BASE_BIN=/path/to/older/buildshuttle bash benches/failing_build_cost.sh   # and a baseline,
#                                                           # alternating, same rounds
#   DATA_BASE=/tmp ROUNDS=5 MEASURE_S=10 bash …             # DATA_DIR on the disk (default
#                                                           # /dev/shm: no filesystem effects)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
MEASURE_S=${MEASURE_S:-10}
POST_S=${POST_S:-4}
DATA_BASE=${DATA_BASE:-/dev/shm}
command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null
if [ -z "${BIN:-}" ]; then
  cargo build --release --bin buildshuttle 2>&1 | tail -1
  BIN=target/release/buildshuttle
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tick=$(getconf CLK_TCK)
pid= datas=
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf $datas' EXIT

# One round for binary $1: a POST burst of POST_S seconds, then MEASURE_S seconds of draining.
measure() {
  local bin=$1 port closed data c0 c1 d0 d1 s0 s1 n
  port=$(free_port); closed=$(free_port)
  data=$(mktemp -d "$DATA_BASE/failing-build-cost.XXXXXX"); datas="$datas $data"
  PORT=$port LISTEN_ADDRESS=127.0.0.1 DATA_DIR="$data" "$bin" serve >"$data/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/octhc" >/dev/null && break; sleep 0.1; done
  SOURCES="http://127.0.0.1:$closed/gone.tgz" wrk -t2 -c32 -d"${POST_S}s" -s benches/post_rate.lua \
    "http://127.0.0.1:$port/" >/dev/null
  sleep 1
  cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
  finished() { wc -l <"$data/state/done.log"; }
  busy() { awk '/^cpu /{print $2 + $3 + $4 + $6 + $7 + $8}' /proc/stat; }
  c0=$(cpu); d0=$(finished); s0=$(busy)
  sleep "$MEASURE_S"
  c1=$(cpu); d1=$(finished); s1=$(busy)
  kill $pid; wait $pid 2>/dev/null || true
  n=$((d1 - d0))
  [ "$n" -gt 0 ] || { echo "no build finished in the window" >&2; exit 1; }
  printf '%-10s %10s %12s %18s\n' "$2" "$((n / MEASURE_S))" \
    "$(( (c1 - c0) * 1000000 / tick / n ))" "$(( (s1 - s0) * 1000000 / tick / n ))"
}

printf '%-10s %10s %12s %18s\n' binary "builds/s" "service µs" "machine busy µs"
for _ in $(seq "$ROUNDS"); do
  measure "$BIN" ours
  [ -z "${BASE_BIN:-}" ] || measure "$BASE_BIN" base
done
