#!/usr/bin/env bash
# Guest-inflicted faults stay inside the guest (issue #17): a fork bomb and an OOM storm in one
# sandbox against another sandbox's `exec true` latency and the daemon's /healthz, against the same
# measures with the noisy sandbox idle, in the same run (bench/isolation.py). Starts a daemon (temp
# HEARTH_HOME, test registry, python test image, release build); everything is deleted at the end.
#
# Usage: bench/isolation.sh [CALLS]   (default 30; root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh
calls=${1:-30}

bench_release_daemon isolation python --accel tcg --memory 256m --capacity-disk 20g

python3 bench/isolation.py --host "http://$addr" --token "$token" --image "$image" --calls "$calls"
