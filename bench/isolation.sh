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

scripts/provision.sh > /dev/null
cargo build --quiet --release -p hearth
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
target=${CARGO_TARGET_DIR:-$PWD/target}
hearth=$target/release/hearth

bench_daemon_init isolation
image=$HEARTH_TEST_REGISTRY/hearth-test/python
token=bench-token-$RANDOM$RANDOM
printf '[[tenants]]\nname = "bench"\ntoken = "%s"\n' "$token" > "$work/tokens.toml"
bench_daemon_start --accel tcg --memory 256m --capacity-disk 20g

python3 bench/isolation.py --host "http://$addr" --token "$token" --image "$image" --calls "$calls"
