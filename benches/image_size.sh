#!/usr/bin/env bash
# Runtime image size: ours (stripped release binary on the Debian-package "cc" base that
# .ci/image makes) vs the previous image (unstripped release binary on debian:bookworm-slim,
# the Dockerfile as of commit 639eddf), side by side. Release build; nothing is pulled.
#   bash benches/image_size.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${BUILDSHUTTLE_TEST_STATE:-/tmp/buildshuttle-test}
PREVIOUS=${PREVIOUS:-639eddf}
bash .ci/services docker >/dev/null
cargo build --release --bin buildshuttle 2>&1 | tail -1
BIN=target/release/buildshuttle

BIN=$BIN IMAGE=buildshuttle:size-ours bash .ci/image

if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  echo "[size] debootstrap bookworm minbase → debian:bookworm-slim (the previous base)"
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  root="$STATE/bookworm-rootfs"
  rm -rf "$root"
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian' | head -1 || true)
  debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >"$STATE/debootstrap.log" 2>&1
  tar -C "$root" -c . | docker import - debian:bookworm-slim >/dev/null
  rm -rf "$root"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ctx" "$work/b/out" "$work/b/bin" "$work/b/etc/ssl/certs"
git show "$PREVIOUS:Dockerfile" >"$work/ctx/Dockerfile"
cp "$BIN" "$work/b/out/buildshuttle"
cp /bin/busybox "$work/b/bin/busybox" && ln -s busybox "$work/b/bin/sh"
cp /etc/ssl/certs/ca-certificates.crt "$work/b/etc/ssl/certs/"
tar -C "$work/b" -c . | docker import --change 'ENV PATH=/bin' - buildshuttle-prebuilt:size-previous >/dev/null
docker build -q --build-arg BUILDER_IMAGE=buildshuttle-prebuilt:size-previous \
  --build-arg RUNTIME_IMAGE=debian:bookworm-slim -t buildshuttle:size-previous "$work/ctx" >/dev/null
docker run --rm buildshuttle:size-previous --version >/dev/null

mb() { echo $(( $(docker image inspect -f '{{.Size}}' "$1") / 1000000 )); }
printf '%-28s %-26s %12s %10s %10s\n' image base "binary MB" "base MB" "image MB"
printf '%-28s %-26s %12s %10s %10s\n' "previous ($PREVIOUS)" debian:bookworm-slim \
  "$(( $(stat -c %s "$BIN") / 1000000 ))" "$(mb debian:bookworm-slim)" "$(mb buildshuttle:size-previous)"
printf '%-28s %-26s %12s %10s %10s\n' "ours" buildshuttle-base:cc \
  "$(strip --strip-all -o "$work/stripped" "$BIN" && echo $(( $(stat -c %s "$work/stripped") / 1000000 )))" "$(mb buildshuttle-base:cc)" "$(mb buildshuttle:size-ours)"
