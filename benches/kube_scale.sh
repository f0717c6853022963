#!/usr/bin/env bash
# Controller scale on the simulated cluster (kubesim, instant kubelet): 100 then 1,000
# BuildJobs with MAXIMUM_PARALLEL_BUILDS=50; prints requests per build (flat = no polling),
# list/watch calls, the reconcile p99 (bucket bound, from /metrics), wall time and the
# controller's peak RSS for each count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/services
for n in 100 1000; do
  KUBE_SCALE_BUILDS=$n KUBE_SCALE_PARALLEL=50 cargo nextest run --test kube_scale --no-capture 2>&1 | grep -E '^KUBE_SCALE builds|PASS|FAIL|panicked'
done
