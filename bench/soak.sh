#!/usr/bin/env bash
# Chaos soak (issue 17): a real `hearth serve` under a steady mixed load from several tenants while
# faults are injected (bench/soak.py says which), then the checks: nothing lost, leaked or left
# running, accounting equal to what lives, fds and RSS back, /healthz p99 < 50 ms, no hung request.
#
#   bench/soak.sh DURATION     release build; first the same load without faults for a quarter of
#                              DURATION (at least 2 min) as the baseline, then DURATION with faults;
#                              prints both reports and the table for bench/README.md
#   bench/soak.sh --suite      what scripts/test.sh runs after the tests: 150 s with faults, the
#                              debug build, the test registry of the run ($HEARTH_TEST_REGISTRY)
# DURATION: seconds, or with a unit: 90s, 10m, 1h. Root (loop mounts, signals). Exits 1 when a
# check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

suite=
case "${1:-}" in
--suite) suite=1; seconds=150 ;;
*[0-9]h) seconds=$(( ${1%h} * 3600 )) ;;
*[0-9]m) seconds=$(( ${1%m} * 60 )) ;;
*[0-9]s) seconds=${1%s} ;;
*[0-9]) seconds=$1 ;;
*) echo "usage: bench/soak.sh DURATION | --suite" >&2; exit 2 ;;
esac

export HEARTH_AGENT
if [ -n "$suite" ]; then
    HEARTH_AGENT=${HEARTH_AGENT:-$(scripts/build-agent.sh)}
    cargo build --quiet -p hearth
    hearth=${CARGO_TARGET_DIR:-$PWD/target}/debug/hearth
else
    scripts/provision.sh test > /dev/null
    HEARTH_AGENT=$(scripts/build-agent.sh)
    cargo build --quiet --release -p hearth
    hearth=${CARGO_TARGET_DIR:-$PWD/target}/release/hearth
fi

work=$(mktemp -d /tmp/hearth-soak.XXXXXX)
registry_owned=
cleanup() {
    local status=$?
    [ -n "$registry_owned" ] && scripts/test-registry.sh stop "$work/registry"
    if [ "$status" -ne 0 ]; then  # keep what explains a failed check
        keep=$(mktemp -d /tmp/hearth-soak-failed.XXXXXX)
        cp "$work"/*.json "$keep"/ 2>/dev/null || true
        for log in "$work"/*/daemon.log; do
            [ -f "$log" ] && cp "$log" "$keep/$(basename "$(dirname "$log")")-daemon.log"
        done
        echo "soak: reports and daemon logs kept in $keep" >&2
    fi
    rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${HEARTH_TEST_REGISTRY:-}" ]; then
    HEARTH_TEST_REGISTRY=$(scripts/test-registry.sh start "$work/registry")
    registry_owned=1
fi

soak() {  # NAME ARGS...
    local name=$1; shift
    mkdir -p "$work/$name"
    python3 bench/soak.py --hearth "$hearth" --registry "$HEARTH_TEST_REGISTRY" \
        --work "$work/$name" --report "$work/$name.json" "$@"
}

if [ -n "$suite" ]; then
    soak faults --duration "$seconds"
    exit
fi
baseline=$(( seconds / 4 > 120 ? seconds / 4 : 120 ))
status=0
soak calm --duration "$baseline" --no-faults || status=1
soak faults --duration "$seconds" || status=1
python3 bench/soak_lib/table.py "$work/calm.json" "$work/faults.json"
exit $status
