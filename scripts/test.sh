#!/usr/bin/env bash
# hearth's whole test suite on a fresh Debian 12 machine: provision, check style, build the static
# agent, start one test registry for the run, run every test with cargo-nextest, stop the registry.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/provision.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
# CI can reach Debian's archive: the kernel provisioning test (hearth setup's apt path) runs too.
export HEARTH_TEST_APT=1

state=$(mktemp -d /tmp/hearth-test-registry.XXXXXX)
trap 'scripts/test-registry.sh stop "$state"' EXIT
HEARTH_TEST_REGISTRY=$(scripts/test-registry.sh start "$state")
export HEARTH_TEST_REGISTRY

cargo nextest run --workspace --no-fail-fast "$@"
