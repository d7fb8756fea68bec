#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a fixed time budget and prints, per target, the executions
# libFuzzer reports, the size of the corpus it built (in a scratch directory seeded from
# fuzz/corpus/TARGET, which stays untouched) and the findings (crash, leak, timeout and
# out-of-memory artifacts written during this run). No peer: the figures are absolute.
#
#   targets: layer_apply (layer tars, issue 12 limits), reference_parse (image references),
#            oci_documents (manifests, indexes, configs), agent_frames (exec frame codec and the agent's
#            JSON answers), handshake_lines (handshake line reader and parser), sni (the egress
#            proxy's TLS SNI / HTTP Host reader).
#
# Usage: bench/fuzz.sh [SECONDS]   (per target, default 30; needs the nightly toolchain and cargo-fuzz,
# `cargo install cargo-fuzz`). Findings stay in fuzz/artifacts/TARGET/ to reproduce with
# `cargo +nightly fuzz run TARGET ARTIFACT`. Exits non-zero if any target found something.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-30}
targets=(layer_apply reference_parse oci_documents agent_frames handshake_lines sni)

cargo +nightly fuzz --version > /dev/null 2>&1 || {
    echo "cargo-fuzz on nightly is missing: rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    exit 2
}
echo "building ${#targets[@]} targets..." >&2
cargo +nightly fuzz build > /dev/null 2>&1 || cargo +nightly fuzz build

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
found_any=0
printf '| target | seconds | executions | exec/s | corpus | findings |\n|---|---|---|---|---|---|\n'
for t in "${targets[@]}"; do
    mkdir -p "artifacts/$t" "$logs/corpus-$t"
    seeds=()
    [ -d "corpus/$t" ] && seeds=("corpus/$t")
    before=$(find "artifacts/$t" -type f | wc -l)
    set +e
    # New inputs go to a scratch corpus (the first directory), seeded from the checked-in one.
    cargo +nightly fuzz run "$t" "$logs/corpus-$t" "${seeds[@]}" -- -max_total_time="$secs" \
        -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 > "$logs/$t.log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
    corpus=$(find "$logs/corpus-$t" -type f | wc -l)
    after=$(find "artifacts/$t" -type f | wc -l)
    findings=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$findings" -eq 0 ]; then
        findings="run failed (exit $rc, see below)"
    fi
    [ "$findings" != 0 ] && found_any=1
    printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "$corpus" "$findings"
done
if [ "$found_any" -ne 0 ]; then
    for t in "${targets[@]}"; do
        grep -E "ERROR|panicked|SUMMARY|Test unit written" "$logs/$t.log" | sed "s/^/$t: /" >&2 || true
    done
    exit 1
fi
