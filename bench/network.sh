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
# Interleaved, so that the machine's drift hits both alike: 7 runs each, medians.
one() { local s e; s=$(date +%s%N); "$hearth" run --accel tcg --memory 256m "$@" "$image" true; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
with=(); without=()
for _ in 1 2 3 4 5 6 7; do
    with+=("$(one)")
    without+=("$(one --no-network)")
done
median() { printf '%s\n' "$@" | sort -n | sed -n 4p; }
w=$(median "${with[@]}"); wo=$(median "${without[@]}")
echo "hearth run busybox true   with network ${w} ms | --no-network ${wo} ms | added $((w - wo)) ms (medians of 7, interleaved)"
