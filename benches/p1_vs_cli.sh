#!/usr/bin/env bash
# P1: POST / → final callback, against the raw Docker CLI doing the same work
# (`docker build --no-cache -t R:1.N -t R:latest . && docker push R:1.N && docker push R:latest`),
# in interleaved pairs on the same daemon and registry, same small app as the tests.
# Prints each pair, the medians and the ratio, plus our median per-stage timings.
#   bash benches/p1_vs_cli.sh                 # small app, 7 pairs
#   PAIRS=5 BIG_MIB=100 bash benches/p1_vs_cli.sh   # + a 100 MiB file, sources over http
#   BIG_KIND=source PAIRS=5 BIG_MIB=100 bash …      # the big file compressible source text, not random
#   RATE_MIBS=50 PAIRS=5 BIG_MIB=100 bash …        # the sources served at 50 MiB/s (a download that lasts)
#   ARGS=8 bash benches/p1_vs_cli.sh              # with 8 build args (each side)
#   DOCKER_BUILDKIT=true bash benches/p1_vs_cli.sh   # ours with BuildKit (auto: the classic builder here)
# The CLI side uses the classic builder (the CLI here has no buildx, so no BuildKit).
# Run after `bash .ci/services` and `cargo build --release`. Ours runs with NO_CACHE=true,
# as the CLI side runs with --no-cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-7}
BIG_MIB=${BIG_MIB:-0}
BIG_KIND=${BIG_KIND:-random}
# ARGS=N: ours gets N build args (as controller-api sends an app's config), the CLI the same
# --build-arg flags; the app's Dockerfile does not use them.
ARGS=${ARGS:-0}
args_json=""; cli_args=()
for k in $(seq 1 "$ARGS"); do
  args_json="$args_json${args_json:+,}\"CONFIG_VAR_$k\":\"value-$k\""
  cli_args+=(--build-arg "CONFIG_VAR_$k=value-$k")
done
BIN=${BIN:-target/release/buildshuttle}
PORT=${PORT:-9320}
CB_PORT=${CB_PORT:-9321}
FILES_PORT=${FILES_PORT:-9322}
REG=127.0.0.1:5000
[ -x "$BIN" ] || { echo "build first: cargo build --release"; exit 1; }
work=$(mktemp -d /tmp/buildshuttle-p1.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "[p1] $*"; }
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

python3 benches/callback_recorder.py "$CB_PORT" "$work/callbacks" & pids+=($!)
mkdir -p "$work/www"
if [ -n "${RATE_MIBS:-}" ]; then
  # A source server at a capped rate, as over a real network (the download then lasts).
  python3 benches/throttled_http.py "$FILES_PORT" "$work/www" "$RATE_MIBS" & pids+=($!)
else
  (cd "$work/www" && exec python3 -m http.server "$FILES_PORT" --bind 127.0.0.1 >/dev/null 2>&1) & pids+=($!)
fi
PORT=$PORT LISTEN_ADDRESS=127.0.0.1 DATA_DIR="$work/data" NO_CACHE=true RUST_LOG=warn \
  DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-auto} \
  MAX_SOURCE_BYTES=$((4 << 30)) "$BIN" serve >"$work/service.log" 2>&1 & pids+=($!)
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$PORT/octhc" >/dev/null && break; sleep 0.2; done
curl -sf "http://127.0.0.1:$PORT/octhc" >/dev/null || { cat "$work/service.log"; exit 1; }

# The app: the tests' small app (FROM the base, a RUN), optionally with a big incompressible file.
app_dir() {
  local dir=$1 marker=$2
  mkdir -p "$dir"
  printf 'FROM test/busybox:latest\nRUN echo p1-%s\nCOPY . /app\n' "$marker" > "$dir/Dockerfile"
  echo "hello" > "$dir/index.txt"
  if [ "$BIG_MIB" -gt 0 ]; then cp "$work/big.bin" "$dir/big.bin"; fi
}
if [ "$BIG_MIB" -gt 0 ] && [ "$BIG_KIND" = source ]; then
  # Real source text (the cargo registry's crates, gzip about 4:1): the archive is inflated
  # twice by ours (checked while it downloads, then streamed to dockerd).
  { tar -C "${CARGO_HOME:-$HOME/.cargo}/registry/src" -cf - . 2>/dev/null || true; } | head -c "$((BIG_MIB << 20))" > "$work/big.bin"
elif [ "$BIG_MIB" -gt 0 ]; then
  head -c "$((BIG_MIB << 20))" /dev/urandom > "$work/big.bin"
fi

ours() {
  local i=$1 app_uuid build_uuid sources
  app_uuid=$(cat /proc/sys/kernel/random/uuid); build_uuid=$(cat /proc/sys/kernel/random/uuid)
  app_dir "$work/ours-$i" "ours$i$RANDOM"
  tar -C "$work/ours-$i" -czf "$work/www/ours-$i.tgz" .
  if [ "$BIG_MIB" -gt 0 ]; then
    sources="http://127.0.0.1:$FILES_PORT/ours-$i.tgz"
  else
    sources="data:base64,$(base64 -w0 "$work/www/ours-$i.tgz")"
  fi
  printf '{"app":"pone","space":"default","app_uuid":"%s","build_uuid":"%s","build_number":1,"sources":"%s","gm_registry_host":"%s","gm_registry_repo":"bench","callback":"http://127.0.0.1:%s/b/%s","build_args":{%s}}' \
    "$app_uuid" "$build_uuid" "$sources" "$REG" "$CB_PORT" "$build_uuid" "$args_json" > "$work/post.json"
  local t0 t1
  if [ "$BIG_MIB" -gt 0 ]; then
    # The same download alone (into a file, as ours writes it), for "ours ≤ cli + download"
    # with a download time that is not ours: ours overlaps it with the build now.
    curl -sf -o "$work/alone.tgz" -w '%{time_total}\n' "$sources" >> "$work/alone"
    rm -f "$work/alone.tgz"
  fi
  # The inputs' dirty pages (the copied app, its archive) are the bench's, not the build's:
  # each side starts with them on disk, so neither build waits for the other's writeback.
  sync
  t0=$(now)
  curl -sf -X POST "http://127.0.0.1:$PORT/" -H 'content-type: application/json' --data-binary @"$work/post.json" >/dev/null
  until grep -q "/b/$build_uuid .*\"status\":\"\(succeeded\|failed\)\"" "$work/callbacks" 2>/dev/null; do sleep 0.01; done
  grep -q "/b/$build_uuid .*succeeded" "$work/callbacks" || { curl -s "http://127.0.0.1:$PORT/pone-$app_uuid/1/logs" | tail; exit 1; }
  t1=$(grep "/b/$build_uuid .*\"status\":\"succeeded\"" "$work/callbacks" | cut -d' ' -f1)
  curl -sf "http://127.0.0.1:$PORT/pone-$app_uuid/1/logs" | grep '^Timings: ' >> "$work/timings"
  # Ours moves the app's local `latest` to the image beside the final callback (tidy): wait
  # for it, so each run leaves the daemon as it found it.
  for _ in $(seq 100); do docker image inspect "$REG/bench/pone-$app_uuid:latest" >/dev/null 2>&1 && break; sleep 0.02; done
  docker rmi "$REG/bench/pone-$app_uuid:1.1" "$REG/bench/pone-$app_uuid:latest" >/dev/null 2>&1 || true
  echo "$t1 - $t0" | bc
}

# raw I [labels]: the CLI; with "labels", also the four image labels the contract requires
# (each build sets them: one more build step, a container created and committed).
raw() {
  local i=$1 repo t0 t1 labels=()
  repo="$REG/bench/praw-$(cat /proc/sys/kernel/random/uuid)"
  app_dir "$work/raw-$i" "raw$i$RANDOM"
  if [ "${2:-}" = labels ]; then
    labels=(--label app=praw --label space=default --label "build_uuid=$(cat /proc/sys/kernel/random/uuid)" --label "app_uuid=${repo##*praw-}")
  fi
  local tb tp
  sync
  t0=$(now)
  # DOCKER_BUILDKIT=0: the classic builder (the CLI here has no buildx), whatever ours uses.
  DOCKER_BUILDKIT=0 docker build --no-cache "${labels[@]}" "${cli_args[@]}" -t "$repo:1.1" -t "$repo:latest" "$work/raw-$i" >/dev/null 2>&1 \
    && tb=$(now) && docker push "$repo:1.1" >/dev/null && tp=$(now) && docker push "$repo:latest" >/dev/null \
    || { echo "[p1] the CLI's build or push failed" >&2; exit 1; }
  t1=$(now)
  # The bare CLI's own stages, to set beside ours (ms).
  [ "${2:-}" = labels ] || echo "$t0 $tb $tp $t1" | awk '{printf "build %d push %d push_latest %d\n", ($2-$1)*1000, ($3-$2)*1000, ($4-$3)*1000}' >> "$work/cli_stages"
  docker rmi "$repo:1.1" "$repo:latest" >/dev/null 2>&1 || true
  echo "$t1 - $t0" | bc
}

say "app: FROM test/busybox, a RUN, a COPY$([ "$BIG_MIB" -gt 0 ] && echo " of a ${BIG_MIB} MiB $BIG_KIND file (ours: sources over http)"); $PAIRS interleaved pairs"
ours warmup >/dev/null; raw warmup >/dev/null
: > "$work/timings"; : > "$work/cli_stages"
printf '%-6s %9s %9s %9s %10s %10s\n' pair ours_s cli_s cli+lbl_s ours/cli ours/cli+lbl
for i in $(seq 1 "$PAIRS"); do
  # Interleaved, the order rotating so no side always runs first.
  case $((i % 3)) in
    1) o=$(ours "$i"); r=$(raw "$i"); l=$(raw "$i" labels) ;;
    2) r=$(raw "$i"); l=$(raw "$i" labels); o=$(ours "$i") ;;
    0) l=$(raw "$i" labels); o=$(ours "$i"); r=$(raw "$i") ;;
  esac
  echo "$o" >> "$work/o"; echo "$r" >> "$work/r"; echo "$l" >> "$work/l"
  printf '%-6s %9.3f %9.3f %9.3f %10.3f %10.3f\n' "$i" "$o" "$r" "$l" "$(echo "$o / $r" | bc -l)" "$(echo "$o / $l" | bc -l)"
done
mo=$(median < "$work/o"); mr=$(median < "$work/r"); ml=$(median < "$work/l")
printf 'median %9.3f %9.3f %9.3f %10.3f %10.3f\n' "$mo" "$mr" "$ml" "$(echo "$mo / $mr" | bc -l)" "$(echo "$mo / $ml" | bc -l)"
echo "ours = POST → final callback (DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-auto}); cli = docker build --no-cache + push 1.N + push latest; cli+lbl = the same with the 4 image labels"
if [ "$BIG_MIB" -gt 0 ]; then
  # The goal for big apps: ours ≤ cli + the download time (our `fetch` stage).
  sed -n 's/.* fetch \([0-9]*\) ms.*/\1/p' "$work/timings" > "$work/fetch"
  paste "$work/o" "$work/fetch" | awk '{print $1 - $2 / 1000}' > "$work/of"
  mf=$(median < "$work/fetch"); mof=$(median < "$work/of")
  printf 'download (fetch) median %.3f s; (ours − download) median %.3f s = %.3f × cli, %.3f × cli+lbl\n' \
    "$(echo "$mf / 1000" | bc -l)" "$mof" "$(echo "$mof / $mr" | bc -l)" "$(echo "$mof / $ml" | bc -l)"
  # The same with the download timed alone (curl, just before each of our runs; the warm-up's
  # first line left out), since our fetch now overlaps the build and the two share the cores.
  tail -n +2 "$work/alone" > "$work/alone_runs"
  paste "$work/o" "$work/alone_runs" | awk '{print $1 - $2}' > "$work/oa"
  ma=$(median < "$work/alone_runs"); moa=$(median < "$work/oa")
  printf 'download alone (curl) median %.3f s; (ours − that) median %.3f s = %.3f × cli\n' \
    "$ma" "$moa" "$(echo "$moa / $mr" | bc -l)"
fi
# Median of each stage over the runs (ms).
stages=$(head -1 "$work/timings" | sed 's/^Timings: //; s/ [0-9]* ms//g; s/,//g')
line="ours, median per stage:"
for s in $stages; do
  m=$(sed -n "s/.*[ ,]$s \([0-9]*\) ms.*/\1/p; s/^Timings: $s \([0-9]*\) ms.*/\1/p" "$work/timings" | median)
  line="$line $s ${m} ms,"
done
echo "${line%,}"
if [ -s "$work/cli_stages" ]; then
  line="cli, median per stage:"
  for s in build push push_latest; do
    m=$(sed -n "s/.*\b$s \([0-9]*\).*/\1/p" "$work/cli_stages" | median)
    line="$line $s ${m} ms,"
  done
  echo "${line%,}"
fi
