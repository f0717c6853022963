#!/usr/bin/env bash
# Controller scale on the simulated cluster (kubesim, instant kubelet): 100 then 1,000
# BuildJobs with MAXIMUM_PARALLEL_BUILDS=50; prints requests per build (flat = no polling),
# list/watch calls, the reconcile p99 (from /metrics: the bucket bound and the estimate
# interpolated within it), wall time, the controller's peak and final RSS, CPU seconds of
# the controller and of the test process (simulator included), and the machine's load.
# KUBE_SCALE_TRACE=1 also prints where each reconcile's time went, step by step (the
# controller logs every reconcile then, which costs it some CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/services
for n in 100 1000; do
  KUBE_SCALE_BUILDS=$n KUBE_SCALE_PARALLEL=50 cargo nextest run --test kube_scale --no-capture 2>&1 |
    grep -E '^KUBE_SCALE (builds|cpu|steps)|PASS|FAIL|panicked'
done
