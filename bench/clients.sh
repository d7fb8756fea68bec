#!/usr/bin/env bash
# What an agent's tool call waits for (issue #15): exec and run_code round trips on one running
# sandbox through the API and the Python SDK, against the daemon-only and guest-round-trip floors,
# in the same run (bench/clients.py has the rows). Starts a daemon (temp HEARTH_HOME, test
# registry, python test image, release build); everything is deleted and stopped at the end.
#
# Usage: bench/clients.sh [CALLS]   (default 50; root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh
calls=${1:-50}

bench_release_daemon clients python --accel tcg --memory 256m --capacity-disk 20g

python=$(scripts/python-env.sh 2>/dev/null)/bin/python
PYTHONPATH=$PWD/sdk/python/src "$python" bench/clients.py --host "http://$addr" --token "$token" \
    --image "$image" --calls "$calls"
