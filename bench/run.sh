#!/usr/bin/env bash
# hearth run overhead against the boot floor, in the same run.
#
#   hearth: `hearth run <registry>/hearth-test/busybox true`, image cached, whole-process wall time.
#   floor:  the same QEMU binary, accelerator, kernel and command line booting an initramfs whose /init
#           powers off at once (crates/hearth-vm/examples/floor.rs), start to exit.
# Runs alternate (floor, hearth, floor, hearth, ...) so machine load hits both alike. Prints each run,
# both medians, the overhead ratio (target: hearth <= 1.15x floor) and hearth's own split of its time.
#
# Usage: bench/run.sh [RUNS]   (default 5; root; provisions like scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}

scripts/provision.sh > /dev/null
cargo build --quiet --release -p hearth
cargo build --quiet --release -p hearth-vm --example floor
export HEARTH_AGENT
HEARTH_AGENT=$(scripts/build-agent.sh)
target=${CARGO_TARGET_DIR:-$PWD/target}
hearth=$target/release/hearth
floor=$target/release/examples/floor
kernel=/var/cache/hearth-test/kernel

work=$(mktemp -d /tmp/hearth-bench-run.XXXXXX)
cleanup() {
    [ -n "${HEARTH_TEST_REGISTRY_OWNED:-}" ] && scripts/test-registry.sh stop "$work/registry"
    rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${HEARTH_TEST_REGISTRY:-}" ]; then
    HEARTH_TEST_REGISTRY=$(scripts/test-registry.sh start "$work/registry")
    HEARTH_TEST_REGISTRY_OWNED=1
fi
export HEARTH_HOME=$work/home HEARTH_KERNEL=$kernel HEARTH_INSECURE_REGISTRIES=$HEARTH_TEST_REGISTRY
image=$HEARTH_TEST_REGISTRY/hearth-test/busybox

# Warm-up: pull the image, build the initramfs, measure the TSC, probe KVM and build the QEMU snapshot
# template once (all cached; the timed runs restore from the template).
"$hearth" run --accel tcg "$image" true
"$floor" --home "$work/floor-home" --kernel "$kernel" --accel tcg --boot 1 > /dev/null

now() { date +%s.%N; }
: > "$work/floor.txt"; : > "$work/hearth.txt"; : > "$work/split.txt"
for i in $(seq "$runs"); do
    "$floor" --home "$work/floor-home" --kernel "$kernel" --accel tcg --boot 1 \
        | awk '/^floor boot/ {print $4}' >> "$work/floor.txt"
    start=$(now)
    "$hearth" run --accel tcg --timings "$image" true 2>> "$work/split.txt"
    end=$(now)
    echo "$start $end" | awk '{printf "%.3f\n", $2 - $1}' >> "$work/hearth.txt"
    echo "run $i: floor $(tail -1 "$work/floor.txt") s, hearth $(tail -1 "$work/hearth.txt") s"
done

python3 - "$work" <<'PY'
import re, statistics, sys
work = sys.argv[1]
floor = [float(x) for x in open(f"{work}/floor.txt").read().split()]
hearth = [float(x) for x in open(f"{work}/hearth.txt").read().split()]
fm, hm = statistics.median(floor), statistics.median(hearth)
print(f"floor  median {fm:.3f} s over {len(floor)} boots (QEMU + kernel + /init that powers off)")
print(f"hearth median {hm:.3f} s over {len(hearth)} runs (hearth run busybox true, image cached)")
print(f"ratio hearth/floor = {hm / fm:.3f} (overhead {100 * (hm / fm - 1):+.1f}%, target <= +15%)")
splits = {}
for line in open(f"{work}/split.txt"):
    for key, value in re.findall(r"([a-z-]+) ([0-9.]+)s", line):
        splits.setdefault(key, []).append(float(value))
print("hearth split (medians): " + ", ".join(
    f"{k} {statistics.median(v):.3f}s" for k, v in splits.items()))
PY
