#!/usr/bin/env bash
# hearth's whole test suite on a fresh Debian 12 machine: provision everything the suite needs
# (`provision.sh test`), check style, build the static agent, start one test registry and one
# Kubernetes control plane (etcd + kube-apiserver) for the run, run every test with cargo-nextest
# and then the short chaos soak (skipped when nextest is given a filter), stop both.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/provision.sh test
# One whole build, not an edit loop: incremental state would only double what the workspace's
# crates take in target/ (set CARGO_INCREMENTAL=1 to keep it).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
# CI can reach Debian's archive: the kernel provisioning test (hearth setup's apt path) runs too.
export HEARTH_TEST_APT=1

state=$(mktemp -d /tmp/hearth-test-registry.XXXXXX)
kube=$(mktemp -d /dev/shm/hearth-test-kube.XXXXXX)
trap 'scripts/test-registry.sh stop "$state"; scripts/kube-env.sh stop "$kube"' EXIT
HEARTH_TEST_REGISTRY=$(scripts/test-registry.sh start "$state")
export HEARTH_TEST_REGISTRY
# One API server for every test process (each would otherwise start its own, ~5 s apiece).
HEARTH_TEST_KUBECONFIG=$(scripts/kube-env.sh start "$kube")
export HEARTH_TEST_KUBECONFIG

cargo nextest run --workspace --no-fail-fast "$@"
# The chaos soak's short variant (issue 17), alone on the machine: a real daemon under mixed load
# from three tenants while daemons, VMMs, guests, the disk and the registry fail (bench/soak.py).
[ $# -gt 0 ] || bench/soak.sh --suite
