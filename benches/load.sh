#!/usr/bin/env bash
# Soak: 200 concurrent POST / with MAXIMUM_PARALLEL_BUILDS=2 against the real binary,
# dockerd and registry (LOAD_BUILDS=N to change the count). Prints the LOAD figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/services docker
cargo nextest run --run-ignored only -E 'test(load_200_concurrent_posts)' --no-capture 2>&1 | grep -E '^LOAD|PASS|FAIL|panicked'
