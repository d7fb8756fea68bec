#!/usr/bin/env bash
# hearth run before and after a change, in the same run: two hearth builds alternate
# (base, head, base, head, ...) on the same image, each with its own HEARTH_HOME (boot templates and
# initramfs are keyed by the binaries that built them), so machine load hits both alike. For checking
# that a refactoring left `hearth run` as fast as it was ("within 5% of before").
#
#   BASE_BIN / BASE_AGENT   the hearth binary and static guest agent of the base commit (build them in
#                           a worktree: `git worktree add ../base REV`, then in it
#                           `CARGO_TARGET_DIR=$PWD/../main/target-base cargo build --release -p hearth`
#                           and `CARGO_TARGET_DIR=... scripts/build-agent.sh`)
#   head                    this tree's release build (built here)
#
# Usage: BASE_BIN=... BASE_AGENT=... bench/compare.sh [RUNS]   (default 9; root)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-9}
: "${BASE_BIN:?set BASE_BIN to the base commit's release hearth binary}"
: "${BASE_AGENT:?set BASE_AGENT to the base commit's static guest agent}"

scripts/provision.sh > /dev/null
cargo build --quiet --release -p hearth
head_agent=$(scripts/build-agent.sh)
target=${CARGO_TARGET_DIR:-$PWD/target}
head_bin=$target/release/hearth
kernel=/var/cache/hearth-test/kernel

work=$(mktemp -d /tmp/hearth-bench-compare.XXXXXX)
cleanup() {
    [ -n "${registry_owned:-}" ] && scripts/test-registry.sh stop "$work/registry"
    rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${HEARTH_TEST_REGISTRY:-}" ]; then
    HEARTH_TEST_REGISTRY=$(scripts/test-registry.sh start "$work/registry")
    registry_owned=1
fi
export HEARTH_KERNEL=$kernel HEARTH_INSECURE_REGISTRIES=$HEARTH_TEST_REGISTRY
image=$HEARTH_TEST_REGISTRY/hearth-test/busybox

run() { # NAME BIN AGENT
    HEARTH_HOME=$work/$1 HEARTH_AGENT=$3 "$2" run --accel tcg "$image" true
}
# Warm-up: pull, initramfs, TSC, boot template, once per side.
run base "$BASE_BIN" "$BASE_AGENT"
run head "$head_bin" "$head_agent"

now() { date +%s.%N; }
for i in $(seq "$runs"); do
    for side in base head; do
        case $side in
            base) bin=$BASE_BIN agent=$BASE_AGENT ;;
            head) bin=$head_bin agent=$head_agent ;;
        esac
        start=$(now)
        run "$side" "$bin" "$agent"
        end=$(now)
        echo "$start $end" | awk '{printf "%.3f\n", $2 - $1}' >> "$work/$side.txt"
    done
    echo "run $i: base $(tail -1 "$work/base.txt") s, head $(tail -1 "$work/head.txt") s"
done

python3 - "$work" <<'PY'
import statistics, sys
work = sys.argv[1]
base = [float(x) for x in open(f"{work}/base.txt").read().split()]
head = [float(x) for x in open(f"{work}/head.txt").read().split()]
bm, hm = statistics.median(base), statistics.median(head)
print(f"base median {bm:.3f} s, head median {hm:.3f} s over {len(base)} runs each")
print(f"ratio head/base = {hm / bm:.3f} ({100 * (hm / bm - 1):+.1f}%, target within +5%)")
PY
