#!/usr/bin/env bash
# Pull benchmark (issue 3): the python test image from the local test registry, empty cache to a ready
# ext4 root filesystem, hearth vs. the peer pipeline `skopeo copy docker://... oci:...` + `umoci unpack`
# + `mkfs.ext4 -d`, interleaved, RUNS runs each (default 5); prints medians and the ratio (target
# <= 0.5), then the median time of a repeat pull of the cached image (target < 100 ms).
#
#   bench/pull.sh                 uses $HEARTH_TEST_REGISTRY, or starts a registry with scripts/test-registry.sh
#   HEARTH_BIN=path bench/pull.sh uses that binary instead of building target/release/hearth
#
# Writes only into a temp directory it removes at exit. Needs root (both sides set owners, device nodes).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
image=hearth-test/python:latest
work=$(mktemp -d "${TMPDIR:-/var/tmp}/hearth-bench.XXXXXX")
reg_state=""

cleanup() {
    if [ -n "$reg_state" ]; then "$repo/scripts/test-registry.sh" stop "$reg_state" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

for tool in skopeo umoci mkfs.ext4 python3; do
    command -v "$tool" >/dev/null || { echo "bench/pull.sh: $tool is not installed" >&2; exit 1; }
done

if [ -n "${HEARTH_BIN:-}" ]; then
    hearth=$HEARTH_BIN
else
    (cd "$repo" && cargo build --quiet --release -p hearth)
    hearth=${CARGO_TARGET_DIR:-$repo/target}/release/hearth
fi

if [ -n "${HEARTH_TEST_REGISTRY:-}" ]; then
    registry=$HEARTH_TEST_REGISTRY
else
    reg_state=$work/registry
    registry=$("$repo/scripts/test-registry.sh" start "$reg_state")
fi
ref=$registry/$image

now_ms() { date +%s%3N; }

run_hearth() {
    rm -rf "$work/home"
    local t0; t0=$(now_ms)
    "$hearth" --home "$work/home" pull -q --insecure-registry "$registry" "$ref" >/dev/null
    echo $(( $(now_ms) - t0 ))
}

run_peer() {
    rm -rf "$work/peer"
    mkdir -p "$work/peer"
    local t0; t0=$(now_ms)
    skopeo copy --quiet --src-tls-verify=false "docker://$ref" "oci:$work/peer/layout:latest"
    umoci unpack --image "$work/peer/layout:latest" "$work/peer/bundle" >/dev/null 2>&1
    # The peer must pick a size too: content plus a quarter plus 64 MiB.
    local kb; kb=$(du -sk "$work/peer/bundle/rootfs" | cut -f1)
    mkfs.ext4 -q -F -d "$work/peer/bundle/rootfs" "$work/peer/rootfs.ext4" "$(( kb + kb / 4 + 65536 ))k" >/dev/null
    echo $(( $(now_ms) - t0 ))
}

median() { python3 -c 'import statistics,sys; print(int(statistics.median(int(x) for x in sys.argv[1:])))' "$@"; }

hearth_ms=(); peer_ms=()
for i in $(seq "$runs"); do
    hearth_ms+=("$(run_hearth)")
    peer_ms+=("$(run_peer)")
    echo "run $i: hearth ${hearth_ms[-1]} ms, peer ${peer_ms[-1]} ms" >&2
done

cached_ms=()
for _ in $(seq "$runs"); do
    t0=$(now_ms)
    "$hearth" --home "$work/home" pull -q --insecure-registry "$registry" "$ref" >/dev/null
    cached_ms+=($(( $(now_ms) - t0 )))
done

h=$(median "${hearth_ms[@]}"); p=$(median "${peer_ms[@]}"); c=$(median "${cached_ms[@]}")
ratio=$(python3 -c "print(f'{$h / $p:.2f}')")
echo "image:            $ref"
echo "hearth pull:      median ${h} ms  (runs: ${hearth_ms[*]})"
echo "skopeo+umoci+mkfs median ${p} ms  (runs: ${peer_ms[*]})"
echo "ratio:            ${ratio}x  (target <= 0.50)"
echo "cached repeat:    median ${c} ms  (runs: ${cached_ms[*]}; target < 100)"
