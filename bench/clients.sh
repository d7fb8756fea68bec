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

scripts/provision.sh > /dev/null
cargo build --quiet --release -p hearth
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
target=${CARGO_TARGET_DIR:-$PWD/target}
hearth=$target/release/hearth

bench_daemon_init clients
image=$HEARTH_TEST_REGISTRY/hearth-test/python
token=bench-token-$RANDOM$RANDOM
printf '[[tenants]]\nname = "bench"\ntoken = "%s"\n' "$token" > "$work/tokens.toml"
bench_daemon_start --accel tcg --memory 256m --capacity-disk 20g

python=$(scripts/python-env.sh 2>/dev/null)/bin/python
PYTHONPATH=$PWD/sdk/python/src "$python" bench/clients.py --host "http://$addr" --token "$token" \
    --image "$image" --calls "$calls"
