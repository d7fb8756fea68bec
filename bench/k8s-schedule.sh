#!/usr/bin/env bash
# Placement throughput of `hearth operator` against a real kube-apiserver (issue 16's target: 10,000
# Pending Sandboxes on 500 registered nodes, all Scheduled in under 10 s from the operator's start, no
# node over capacity; API requests per placed Sandbox reported, from the operator's client and from the
# API server's apiserver_request_total). Creating the objects is set-up, not timed.
# Nodes only register (HearthNode + a heartbeat Lease renewed every 10 s) and run no VMs; the operator is
# the real one, run in-process by crates/hearth-k8s/examples/place_bench.rs. Uses
# $HEARTH_TEST_KUBECONFIG when set, otherwise starts a private etcd + kube-apiserver with
# scripts/kube-env.sh (stopped on exit).
#
#   bench/k8s-schedule.sh [SANDBOXES=10000] [NODES=500]
set -euo pipefail
cd "$(dirname "$0")/.."
sandboxes=${1:-10000}
nodes=${2:-500}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

kubeconfig=${HEARTH_TEST_KUBECONFIG:-}
if [ -z "$kubeconfig" ]; then
    state=$(mktemp -d /dev/shm/hearth-bench-kube.XXXXXX)
    trap 'scripts/kube-env.sh stop "$state" >/dev/null 2>&1 || true' EXIT
    kubeconfig=$(scripts/kube-env.sh start "$state")
fi

cargo build --release -q -p hearth-k8s --example place_bench
"$CARGO_TARGET_DIR/release/examples/place_bench" "$kubeconfig" "$sandboxes" "$nodes"
