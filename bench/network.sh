#!/usr/bin/env bash
# Sandbox networking, measured (issue 13), all in one run:
#   - network set-up and teardown cost (namespace, tap, nftables, resolver and proxy sockets), p50/p99;
#   - policy update latency (API call -> enforced), p50/p99;
#   - one real guest, policy path vs the same guest on a plain tap: request latency and a 32 MiB
#     download, as ratios (target >= 0.8);
#   - what networking adds to `hearth run busybox true` (5 runs each, with and without a network).
# The fake internet (hearth-testkit) stands in for the internet. Details: crates/hearth-sandbox/examples/network_bench.rs.
#
# Usage: bench/network.sh   (root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib/daemon.sh

scripts/provision.sh test > /dev/null
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
cargo build --quiet --release -p hearth
cargo build --quiet --release -p hearth-sandbox --example network_bench
target=${CARGO_TARGET_DIR:-$PWD/target}
hearth=$target/release/hearth

bench_daemon_init network
"$target/release/examples/network_bench"

image=$HEARTH_TEST_REGISTRY/hearth-test/busybox
# Warm-up: pull, initramfs, and one boot template each (a guest with a NIC has its own template).
"$hearth" run --accel tcg --memory 256m "$image" true
"$hearth" run --accel tcg --memory 256m --no-network "$image" true
runs() { # ARGS... -> median wall ms of 5 runs
    local t=()
    for _ in 1 2 3 4 5; do
        local s e
        s=$(date +%s%N)
        "$hearth" run --accel tcg --memory 256m "$@" "$image" true
        e=$(date +%s%N)
        t+=($(( (e - s) / 1000000 )))
    done
    printf '%s\n' "${t[@]}" | sort -n | sed -n 3p
}
with=$(runs)
without=$(runs --no-network)
echo "hearth run busybox true   with network ${with} ms | --no-network ${without} ms | added $((with - without)) ms (median of 5)"
